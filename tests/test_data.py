"""Training data: no patient in two splits, stratified, seeded; preprocessed images cached once."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dicom_router import LABELS
from dicom_router.candidates import load_labelled
from dicom_router.config import Settings
from dicom_router.data import (
    XrayDataset,
    augment,
    build_cache,
    class_weights,
    grouped_folds,
    mixed_weights,
    split_examples,
)
from dicom_router.inference import PreprocessConfig
from dicom_router.synth import synthesize
from tests.dicom_factory import dicom_dataset


def _frame(n_patients: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = LABELS[p % len(LABELS)]
        for i in range(int(rng.integers(1, 4))):
            rows.append({"patient_hash": f"p{p}", "sop_uid_hash": f"p{p}-{i}", "label": label})
    return pd.DataFrame(rows)


def test_no_patient_is_in_two_splits() -> None:
    frame = _frame(200)
    split = split_examples(frame, seed=1)
    where = frame.assign(split=frame["sop_uid_hash"].map(split.assignment))
    assert where["split"].notna().all()
    assert (where.groupby("patient_hash")["split"].nunique() == 1).all()


def test_each_label_is_split_about_70_15_15() -> None:
    frame = _frame(400)
    split = split_examples(frame, seed=2)
    where = frame.assign(split=frame["sop_uid_hash"].map(split.assignment))
    shares = where.groupby("label")["split"].value_counts(normalize=True).unstack()
    assert np.allclose(shares["train"], 0.70, atol=0.05)
    assert np.allclose(shares["val"], 0.15, atol=0.05) and np.allclose(shares["test"], 0.15, atol=0.05)


def test_the_split_is_seeded_and_fingerprinted() -> None:
    frame = _frame(100)
    a, b, c = split_examples(frame, seed=3), split_examples(frame, seed=3), split_examples(frame, seed=4)
    assert a.assignment == b.assignment and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert type(a).from_json(a.to_json()).fingerprint == a.fingerprint


def test_instances_without_a_patient_are_their_own_group() -> None:
    frame = pd.DataFrame(
        {"patient_hash": [None] * 20, "sop_uid_hash": [f"s{i}" for i in range(20)], "label": ["spine"] * 20}
    )
    split = split_examples(frame, seed=0)
    assert sorted(set(split.assignment.values())) == ["test", "train", "val"]


def test_a_split_with_a_share_gets_a_patient_even_when_each_label_has_too_few_to_deal_one_there() -> None:
    frame = pd.DataFrame(
        {
            "patient_hash": [f"p{i}" for i in range(2 * len(LABELS))],
            "sop_uid_hash": [f"s{i}" for i in range(2 * len(LABELS))],
            "label": [LABELS[i % len(LABELS)] for i in range(2 * len(LABELS))],
        }
    )
    for seed in range(5):  # two patients per label: dealt within labels, both would go to train
        split = split_examples(frame, seed=seed)
        where = frame.assign(split=frame["sop_uid_hash"].map(split.assignment))
        assert sorted(where["split"].value_counts().items()) == [
            ("test", 1),
            ("train", 2 * len(LABELS) - 2),
            ("val", 1),
        ]
        assert set(where.loc[where["split"] == "train", "label"]) == set(LABELS)  # every label trains
        cv = split_examples(frame, seed=seed, fractions=(0.85, 0.15, 0.0))
        assert sorted(set(cv.assignment.values())) == ["train", "val"]  # no share, no test patient


def test_the_cache_serves_a_second_run_without_decoding(tmp_path: Path, settings: Settings) -> None:
    data = tmp_path / "dicoms"
    synthesize(data, 12, seed=2, long_side_px=64)
    labelled = load_labelled(settings, data=[str(data)])
    config = PreprocessConfig(image_size=32)
    first, errors = build_cache(labelled.frame, labelled.source, config, settings, progress=False)
    assert not errors and first.images.shape == (12, 32, 32) and first.images.dtype == np.uint16
    shutil.rmtree(data)  # the DICOM files are gone: only the cache can answer now
    second, _ = build_cache(labelled.frame, labelled.source, config, settings, progress=False)
    np.testing.assert_array_equal(first.images, second.images)
    assert first.keys == second.keys and (first.labels == second.labels).all()


def test_a_cached_run_reports_the_decode_errors_of_the_first_and_a_changed_file_is_decoded_again(
    tmp_path: Path, settings: Settings
) -> None:
    data = tmp_path / "dicoms"
    synthesize(data, 5, seed=3, long_side_px=64)
    broken = dicom_dataset(np.zeros((64, 64), np.uint16), raw_pixel_bytes=b"\0" * 100)  # sizes disagree
    victim = data / "broken.dcm"
    broken.save_as(victim, enforce_file_format=True)
    with (data / "labels.csv").open("a") as labels:
        labels.write("broken.dcm,spine,site-a\n")
    labelled = load_labelled(settings, data=[str(data)])
    config = PreprocessConfig(image_size=32)
    first, errors = build_cache(labelled.frame, labelled.source, config, settings, progress=False)
    second, again = build_cache(labelled.frame, labelled.source, config, settings, progress=False)
    assert len(errors) == 1 and [(e.path, e.type, e.reason) for e in again] == [
        (e.path, e.type, e.reason) for e in errors
    ]
    assert first.keys == second.keys and len(first.keys) == 5
    broken.PixelData = np.full((64, 64), 700, np.uint16).tobytes()
    broken.save_as(victim, enforce_file_format=True)  # repaired: new content, decoded (not the cache's)
    repaired = load_labelled(settings, data=[str(data)])
    third, none = build_cache(repaired.frame, repaired.source, config, settings, progress=False)
    assert none == [] and len(third.keys) == 6


def test_augmentation_keeps_shape_range_and_is_seeded() -> None:
    image = torch.rand(1, 32, 32)
    a = augment(image, torch.Generator().manual_seed(1))
    b = augment(image, torch.Generator().manual_seed(1))
    assert a.shape == image.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, image)


def test_balanced_weights_give_every_class_the_same_total() -> None:
    labels = np.array([0, 0, 0, 1, 3, 3], dtype=np.int64)
    weights = class_weights(labels)
    totals = np.bincount(labels, weights=weights, minlength=5)
    assert totals[[0, 1, 3]] == pytest.approx([1.0, 1.0, 1.0]) and totals[[2, 4]].sum() == 0


def test_mixed_in_images_get_their_share_with_classes_balanced_within_each_part() -> None:
    real = np.array([0, 0, 0, 1], dtype=np.int64)
    extra = np.array([2, 2, 4, 4, 4, 4], dtype=np.int64)
    weights = mixed_weights(real, extra, 0.25, balanced=True)
    assert weights.sum() == pytest.approx(1.0) and weights[4:].sum() == pytest.approx(0.25)
    assert weights[:3].sum() == pytest.approx(weights[3]) == pytest.approx(0.375)  # real: 0 and 1 equal
    assert weights[4:6].sum() == pytest.approx(weights[6:].sum())  # synthetic: 2 and 4 equal
    plain = mixed_weights(real, extra, 0.5, balanced=False)
    assert plain[:4] == pytest.approx([0.125] * 4) and plain[4:] == pytest.approx([0.5 / 6] * 6)


def test_the_dataset_yields_unit_range_images_and_labels(tmp_path: Path, settings: Settings) -> None:
    data = tmp_path / "dicoms"
    synthesize(data, 10, seed=4, long_side_px=64)
    labelled = load_labelled(settings, data=[str(data)])
    cached, _ = build_cache(
        labelled.frame, labelled.source, PreprocessConfig(image_size=32), settings, progress=False
    )
    image, meta, label = XrayDataset(cached, train=False)[0]
    assert image.shape == (1, 32, 32) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert meta.ndim == 1 and int(label) in range(5)


def test_grouped_folds_keep_each_source_of_a_multi_source_label_in_one_fold() -> None:
    frame = pd.DataFrame(
        {
            "sop_uid_hash": [f"i{n}" for n in range(30)],
            "label": ["adult_chest"] * 18 + ["spine"] * 12,
            "source": ["openi"] * 8 + ["covid"] * 7 + ["nema"] * 3 + ["cadma"] * 12,
        }
    )
    folds = grouped_folds(frame, "source", 3, seed=0)
    where = frame.assign(fold=frame["sop_uid_hash"].map(folds))
    chest = where[where["label"] == "adult_chest"]
    assert (chest.groupby("source")["fold"].nunique() == 1).all()
    assert chest.groupby("source")["fold"].first().nunique() == 3
    spine = where[where["label"] == "spine"]
    assert sorted(spine["fold"].value_counts()) == [4, 4, 4]


def test_a_label_nearly_all_from_one_source_is_split_by_image_so_every_fold_can_learn_it() -> None:
    frame = pd.DataFrame(
        {
            "sop_uid_hash": [f"i{n}" for n in range(24)],
            "label": ["others"] * 12 + ["spine"] * 12,
            "source": ["fracture"] * 6 + ["skull"] * 4 + ["mura"] * 2 + ["cadma"] * 11 + ["c2c7"],
        }
    )
    folds = grouped_folds(frame, "source", 3, seed=0)
    where = frame.assign(fold=frame["sop_uid_hash"].map(folds))
    spine = where[where["label"] == "spine"]
    assert sorted(spine["fold"].value_counts()) == [4, 4, 4]  # cadma (11 of 12) is not one fold
    others = where[where["label"] == "others"]
    assert (others.groupby("source")["fold"].nunique() == 1).all()  # no source above 2/3: grouped


def test_too_few_patients_to_split_is_a_clear_error_not_a_crash() -> None:
    frame = pd.DataFrame(
        {
            "sop_uid_hash": [f"s{i}" for i in range(2 * len(LABELS))],
            "patient_hash": ["p1"] * 10,
            "label": ["spine"] * 10,
        }
    )
    with pytest.raises(ValueError, match=r"1 patient.*cannot fill train and val"):
        split_examples(frame, seed=0)
