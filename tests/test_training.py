"""Train → register → promote → predict → evaluate, end to end through the CLI on synthetic data,
with MLflow (SQLite) and ONNX Runtime for real."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from dicom_router import LABELS
from dicom_router.calibration import fit_temperature, nll
from dicom_router.candidates import (
    MemberScores,
    Variant,
    combine,
    cross_fitted,
    cross_validate,
    load_labelled,
)
from dicom_router.config import Settings
from dicom_router.data import CachedImages, leave_one_group_out
from dicom_router.inference import (
    METADATA_FEATURES,
    Bundle,
    PreprocessConfig,
    equalize,
    letterbox,
    metadata_vector,
)
from dicom_router.models import BodyPartNet, Scorer, export_bundle
from dicom_router.novelty import Novelty, fit_novelty, novelty_of
from dicom_router.registry import connect
from dicom_router.routing.rules import EXAMPLE_RULES, FALLBACK_BELOW_CONFIDENCE, RoutingRules
from dicom_router.synth import synthesize
from dicom_router.train import (
    TrainConfig,
    TrainResult,
    _follow,
    predict_scores,
    train_candidate,
    training_pool,
)
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("labelled")
    synthesize(folder, 60, sites=3, seed=21, long_side_px=64)
    return folder


def _json(*args: str, env: dict[str, str] | None = None, expect: int = 0) -> Any:
    result = run_cli(*args, "--json", env=env)
    assert result.returncode == expect, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_train_register_promote_predict_and_evaluate(labelled_folder: Path, settings: Settings) -> None:
    data = str(labelled_folder)
    train = [
        "train",
        "--data",
        data,
        "--epochs",
        "2",
        "--image-size",
        "48",
        "--arch",
        "resnet18",
        "--register",
    ]
    [first] = _json(*train)
    assert first["version"] == "1" and 0.0 <= first["test_macro_f1"] <= 1.0

    refused = _json("promote", env={"DICOM_ROUTER_GATE_FLOOR": "1.01"}, expect=4)
    assert refused["promoted"] is False and "floor" in refused["reason"] and refused["champion"] is None
    assert set(refused["candidate"]["recall"]) == set(LABELS)
    promoted = _json("promote", env={"DICOM_ROUTER_GATE_FLOOR": "0"})
    assert promoted["promoted"] is True
    client = connect(settings)
    assert str(client.get_model_version_by_alias("bodypart-router", "champion").version) == "1"
    version = client.get_model_version("bodypart-router", "1")
    assert version.tags["role"] == "candidate" and version.tags["gate.decision"] == "promoted"
    assert version.run_id is not None
    data_report = Path(
        client.download_artifacts(version.run_id, "data_report", str(settings.data_dir / "dr"))
    )
    trained_on = json.loads((data_report / "report.json").read_text())  # what the version was trained on
    assert trained_on["instances"] == 60 and trained_on["deidentification"]["passed"]
    assert sum(row["n"] for row in trained_on["labels"]["labelled"]) == 60
    assert (data_report / "report.html").is_file() and (data_report / "labels.png").is_file()
    assert not (data_report / "rows.parquet").exists()  # the rows (and their object keys) stay behind

    files = sorted(str(p) for p in labelled_folder.rglob("*.dcm"))[:3]
    predictions = _json("predict", *files)
    assert isinstance(predictions, list) and len(predictions) == 3
    for p in predictions:
        assert p["label"] in LABELS and p["model"] == "bodypart-router" and p["version"] == "1"
        assert list(p["probabilities"]) == list(LABELS) and sum(p["probabilities"].values()) == pytest.approx(
            1.0
        )

    report = _json(
        "evaluate", "--model", "models:/bodypart-router@champion", "--data", data, "--split", "test"
    )
    assert isinstance(report, dict) and report["labels"] == list(LABELS)
    bundle = Bundle(settings.data_dir / "models" / "bodypart-router" / "1")
    assert report["n"] == len(bundle.card["test_items"])
    assert all(set(item) == {"sop_uid_hash", "label"} for item in bundle.card["test_items"])  # no keys
    assert np.asarray(report["confusion_matrix"]).shape == (5, 5)
    at_rules = report["abstention"]["at_review_threshold"]
    assert RoutingRules.load(EXAMPLE_RULES).review.below_confidence == "model"
    assert bundle.review_threshold is None  # trained without cross-validation: the rules' fallback
    assert at_rules["threshold"] == FALLBACK_BELOW_CONFIDENCE
    assert at_rules["auto_routed"] == pytest.approx(at_rules["coverage"] * report["n"])

    second = _json(*train, "--fusion", "--seed", "0")
    assert [c["metadata"] for c in second] == [False, True]
    decision = run_cli("promote", "--json", env={"DICOM_ROUTER_GATE_FLOOR": "0"})
    assert decision.returncode in (0, 4), decision.stderr[-2000:]
    judged = json.loads(decision.stdout)
    assert judged["candidate"]["version"] == "3" and judged["champion"]["version"] == "1"
    if judged["passed"]:  # a live deployment: the gate files a request, a person approves it
        assert judged["promoted"] is False and len(judged["request"]) == 12
    assert str(client.get_model_version_by_alias("bodypart-router", "champion").version) == "1"

    other = "1" if judged["promoted"] else "3"  # roll back, or override the gate's refusal
    forced = _json("promote", "--version", other, "--force")
    assert forced["promoted"] is True and forced["candidate"]["version"] == other
    assert str(client.get_model_version_by_alias("bodypart-router", "champion").version) == other
    again = _json("promote", "--version", other)
    assert again["promoted"] is True and "already the champion" in again["reason"]
    history = _json("promote", "--history")
    assert [h["candidate"]["version"] for h in history] == ["1", "1", "3", other, other]
    assert [h["forced"] for h in history] == [False, False, False, True, False]
    assert all("at" in h for h in history)


def _cached(labels: list[int], prefix: str = "k", images: np.ndarray | None = None) -> CachedImages:
    """Cached images with these labels (8-px zeros unless given) and no metadata."""
    n = len(labels)
    return CachedImages(
        [f"{prefix}{i}" for i in range(n)],
        np.zeros((n, 8, 8), np.uint16) if images is None else images,
        np.array(labels, np.int64),
        np.zeros((n, len(METADATA_FEATURES)), np.float32),
    )


def test_mixed_synthetic_images_get_their_share_of_an_epoch_and_real_ones_keep_theirs() -> None:
    real, synthetic = _cached([0] * 30 + [1] * 10, "real"), _cached([2] * 50 + [3] * 50, "syn")
    config = TrainConfig(mix_share=0.2)
    pool, sampler, draws = training_pool(config, real, synthetic)
    assert sampler is not None and draws == 50 == len(sampler)  # 40 real draws an epoch, as without
    assert pool.keys == real.keys + synthetic.keys and list(pool.labels[40:]) == [2] * 50 + [3] * 50
    drawn = np.array([i for _ in range(200) for i in sampler])
    assert np.mean(drawn >= 40) == pytest.approx(0.2, abs=0.01)
    real_labels = pool.labels[drawn[drawn < 40]]
    assert np.mean(real_labels == 1) == pytest.approx(0.5, abs=0.02)  # classes still balanced
    alone, balanced, n = training_pool(config, real)
    assert alone is real and n == 40 and balanced is not None
    assert training_pool(config.model_copy(update={"balanced": False}), real)[1] is None


def test_train_mixes_synthetic_variety_images_in_and_logs_how_many(
    labelled_folder: Path, settings: Settings
) -> None:
    mix = "--mix-synthetic 12 --mix-share 0.3 --synthetic-variety"
    [candidate] = _json(
        "train", "--data", str(labelled_folder), *f"--epochs 1 --image-size 32 --arch resnet18 {mix}".split()
    )
    rendered = pd.read_csv(settings.data_dir / "pretrained" / "synthetic-variety-n12-0" / "labels.csv")
    assert len(rendered) == 12
    run = connect(settings).get_run(candidate["run_id"])
    assert run.data.params["mix_synthetic"] == "12" and run.data.params["mix_share"] == "0.3"
    assert run.data.params["synthetic_variety"] == "True"


def test_the_onnx_bundle_matches_the_torch_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = BodyPartNet("resnet18", metadata=True).eval()
    bundle_dir = export_bundle(
        net, PreprocessConfig(image_size=32, metadata=True), {"note": "test"}, tmp_path / "b"
    )
    bundle = Bundle(bundle_dir)
    images = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    meta = np.random.default_rng(1).random((3, len(METADATA_FEATURES)), dtype=np.float32)
    probabilities, embedding, novelty = bundle.run(images, meta)
    assert novelty is None  # no novelty fitted: the bundle has the contract's two outputs
    with torch.no_grad():
        logits, expected_embedding = net(torch.from_numpy(images), torch.from_numpy(meta))
    np.testing.assert_allclose(probabilities, torch.softmax(logits, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(embedding, expected_embedding.numpy(), atol=1e-4)
    assert json.loads((bundle_dir / "labels.json").read_text()) == list(LABELS)


def test_letterbox_keeps_the_aspect_and_pads_with_black() -> None:
    image = np.ones((20, 40), dtype=np.float32)
    out = letterbox(image, 16)
    assert out.shape == (16, 16)
    assert (out[:4] == 0).all() and (out[-4:] == 0).all() and out[8, 8] == pytest.approx(1.0)


def test_header_features_work_when_fields_are_missing() -> None:
    empty = metadata_vector({})
    full = metadata_vector(
        {
            "age_years": 7,
            "view_position": "AP",
            "pixel_spacing": 0.15,
            "photometric": "MONOCHROME1",
            "modality": "CR",
            "rows": 200,
            "columns": 100,
        }
    )
    assert empty.shape == full.shape == (len(METADATA_FEATURES),)
    named = dict(zip(METADATA_FEATURES, empty, strict=True))
    assert (
        named["age_missing"] == 1.0 and named["view_missing"] == 1.0 and named["pixel_spacing_missing"] == 1.0
    )
    named = dict(zip(METADATA_FEATURES, full, strict=True))
    assert (
        named["age_years"] == pytest.approx(0.07) and named["view_ap"] == 1.0 and named["modality_cr"] == 1.0
    )


def test_cross_validation_by_group_tests_every_image_once_for_every_variant(
    labelled_folder: Path, settings: Settings
) -> None:
    labelled = load_labelled(settings, data=[str(labelled_folder)])
    configs = [
        TrainConfig(arch=arch, epochs=1, image_size=32, batch_size=16)
        for arch in ("resnet18", "mobilenetv2_100")
    ]
    reports = cross_validate(settings, labelled, configs, group_by="site", folds=2, seed=0, progress=False)
    assert list(reports) == [
        "resnet18",
        "mobilenetv2_100",
        "resnet18+mobilenetv2_100",
        "resnet18+flip",
        "mobilenetv2_100+flip",
        "resnet18+mobilenetv2_100+flip",
    ]
    for report in reports.values():
        assert report["n"] == len(labelled.frame) == 60
        assert list(report["per_class"]) == list(LABELS)
        assert sum(g["n"] for g in report["per_group"].values()) == 60
        assert set(report["per_group"]) == set(labelled.frame["site"])
        assert len(report["temperatures"]) == 2 and all(t > 0 for t in report["temperatures"])
        chosen = report["abstention"]["at_threshold_for_target"]
        assert chosen["auto_routed_accuracy"] >= 0.99 or chosen["auto_routed"] == 0
        for key in ("auto_routed", "misrouted"):  # each site's share of what the router did
            in_groups = sum(g["at_threshold"][key] for g in report["per_group"].values())
            assert in_groups == report["abstention"]["at_review_threshold"][key]
        unfamiliar = sum(g["unfamiliar"] for g in report["per_group"].values())  # each fold's own fit
        assert 0 < unfamiliar < 60 and unfamiliar == round(report["abstention"]["unfamiliar"] * 60)
    client = connect(settings)
    found = client.get_experiment_by_name("bodypart-router-candidates")
    assert found is not None
    [run] = client.search_runs(
        [found.experiment_id],
        filter_string="tags.mlflow.runName = 'cv-site-2-resnet18+mobilenetv2_100+flip'",
    )
    assert run.data.metrics["cv_macro_f1"] == pytest.approx(
        reports["resnet18+mobilenetv2_100+flip"]["macro_f1"]
    )


def test_an_ensemble_with_flips_exports_as_one_graph_that_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    members = [BodyPartNet("resnet18").eval(), BodyPartNet("mobilenetv2_100").eval()]
    scorer = Scorer(members, temperature=1.7, flip=True).eval()
    seen = np.random.default_rng(2).random((12, 1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        seen_embedding = scorer(torch.from_numpy(seen))[1].numpy()
    fit = fit_novelty(seen_embedding[:8], np.arange(8) % 5, seen_embedding[8:])
    scorer.novelty = Novelty(fit)
    bundle = Bundle(export_bundle(scorer, PreprocessConfig(image_size=32), {}, tmp_path / "b"))
    assert bundle.card["arch"] == "resnet18+mobilenetv2_100+flip"
    assert bundle.card["temperature"] == pytest.approx(1.7)
    assert bundle.card["novelty"]["scale"] == pytest.approx(fit.scale)
    images = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    probabilities, embedding, novelty = bundle.run(images)
    with torch.no_grad():
        expected, expected_embedding, expected_novelty = scorer(torch.from_numpy(images))
    assert novelty is not None  # computed in the graph, as torch and the numpy fit compute it
    assert np.allclose(novelty, expected_novelty.numpy(), rtol=1e-3)
    assert np.allclose(novelty, novelty_of(fit, embedding), rtol=1e-3)
    np.testing.assert_allclose(probabilities, expected.numpy(), atol=1e-5)
    widths = [m.backbone(torch.zeros(1, 1, 32, 32)).shape[1] for m in members]
    assert embedding.shape == (3, sum(widths))
    np.testing.assert_allclose(embedding, expected_embedding.numpy(), atol=1e-4)
    mirrored = bundle.run(np.ascontiguousarray(images[..., ::-1])).probabilities
    np.testing.assert_allclose(mirrored, probabilities, atol=1e-5)  # TTA: a mirror image scores the same
    with torch.no_grad():
        single = [torch.log_softmax(m(torch.from_numpy(images))[0], 1) for m in members]
        flipped = [torch.log_softmax(m(torch.from_numpy(images).flip(-1))[0], 1) for m in members]
    by_hand = torch.softmax(torch.stack(single + flipped).mean(0) / 1.7, 1)
    np.testing.assert_allclose(probabilities, by_hand.numpy(), atol=1e-5)


def test_member_scores_from_two_passes_equal_what_the_exported_scorers_compute() -> None:
    torch.manual_seed(0)
    nets = [BodyPartNet("resnet18").eval(), BodyPartNet("mobilenetv2_100").eval()]
    rng = np.random.default_rng(1)
    cached = _cached([0] * 5, images=rng.integers(0, 65535, (5, 32, 32), dtype=np.uint16))
    members = [MemberScores.of(net, cached) for net in nets]
    for flip in (False, True):
        expected, expected_embedding = predict_scores(Scorer(nets, flip=flip), cached)
        scores, embedding = combine(Variant((0, 1), flip), members)
        np.testing.assert_allclose(scores, expected, atol=1e-5)
        np.testing.assert_allclose(embedding, expected_embedding, atol=1e-4)


def test_leave_one_group_out_gives_each_collection_its_own_fold() -> None:
    frame = pd.DataFrame(
        {
            "sop_uid_hash": [f"k{i}" for i in range(10)],
            "label": ["adult_chest"] * 4 + ["others"] * 3 + ["spine"] * 3,
            "collection": ["a", "a", "b", "c", "d", "d", "e", "s", "s", "s"],
        }
    )
    folds = leave_one_group_out(frame, "collection", seed=0)
    fold_of_group = {}
    for group in "abcde":
        members = frame.loc[frame["collection"] == group, "sop_uid_hash"]
        [fold_of_group[group]] = {folds[k] for k in members}  # a collection is never split
    assert sorted(fold_of_group.values()) == [0, 1, 2, 3, 4]  # one fold each
    assert len({folds[k] for k in ("k7", "k8", "k9")}) == 3  # a one-collection label is spread by image


def test_several_labelled_folders_train_as_one_set_grouped_by_collection(
    tmp_path: Path, settings: Settings
) -> None:
    for name, seed in (("one", 1), ("two", 2)):
        synthesize(tmp_path / name, 12, sites=2, seed=seed, long_side_px=48)
        labels = pd.read_csv(tmp_path / name / "labels.csv")
        labels["source"] = f"collection {name}"
        labels.to_csv(tmp_path / name / "labels.csv", index=False)
    mapping = tmp_path / "collections.csv"
    mapping.write_text("source,collection\ncollection one,both\n")
    labelled = load_labelled(
        settings, data=[str(tmp_path / "one"), str(tmp_path / "two")], collections=mapping
    )
    assert labelled.source == str(tmp_path)
    assert len(labelled.frame) == 24
    assert {k.split("/")[0] for k in labelled.frame["key"]} == {"one", "two"}
    assert set(labelled.frame["collection"]) == {"both", "collection two"}
    cached, errors = labelled.cached(settings, PreprocessConfig(image_size=32), progress=False)
    assert not errors and len(cached.keys) == 24


@pytest.mark.usefixtures("settings")
def test_an_unknown_model_is_a_usage_error_not_a_crash(tmp_path: Path) -> None:
    result = run_cli("predict", str(tmp_path), "--model", "models:/bodypart-router@nobody")
    assert result.returncode == 64 and "no such model version or alias" in result.stderr
    refused = run_cli("promote")
    assert refused.returncode == 64 and "no candidate version" in refused.stderr


def test_equalisation_spreads_grey_levels_and_keeps_padding_black() -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((64, 64)) * 0.2 + 0.4).astype(np.float32)  # a washed-out, low-contrast image
    image[:8] = 0.0  # padding
    image[8, :4] = [1.0, 1e-4, 1.0 / 1024, 0.5]  # the grid's ends and an edge
    out = equalize(image)
    assert (out[:8] == 0).all()
    inside = out[8:]
    assert inside.min() < 0.05 and inside.max() > 0.99 and abs(float(np.median(inside)) - 0.5) < 0.05
    assert (
        PreprocessConfig(image_size=64, equalize=True).fingerprint()
        != PreprocessConfig(image_size=64).fingerprint()
    )
    counts, edges = np.histogram(image[image > 0], bins=1024, range=(0.0, 1.0))  # the textbook way
    cdf = np.cumsum(counts) / counts.sum()
    textbook = np.where(image > 0, np.interp(image, edges[1:], cdf), 0.0)
    np.testing.assert_allclose(out, textbook, atol=1e-6)
    black = np.zeros((8, 8), dtype=np.float32)
    assert (equalize(black) == 0).all()


def test_cross_fitted_calibration_never_fits_a_fold_on_its_own_labels() -> None:
    rng = np.random.default_rng(0)
    scores = [rng.normal(0.0, 4.0, (60, 5)).astype(np.float32) for _ in range(3)]
    truth = [s.argmax(axis=1) for s in scores]
    truth[2] = rng.integers(0, 5, 60)  # a fold where the model is guessing
    probabilities, temperatures = cross_fitted(scores, truth)
    assert probabilities.shape == (180, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    for k in range(3):
        rest = [i for i in range(3) if i != k]
        expected = fit_temperature(
            np.concatenate([scores[i] for i in rest]), np.concatenate([truth[i] for i in rest])
        )
        assert temperatures[k] == pytest.approx(expected)
    assert temperatures[2] < temperatures[0]  # fitted without the guessing fold: sharper


COUNTER = "backbone.bn1.num_batches_tracked"


def test_the_moving_average_is_a_plain_mean_of_the_first_steps_then_follows_the_newest() -> None:
    torch.manual_seed(0)
    nets = [BodyPartNet("resnet18") for _ in range(3)]
    for i, net in enumerate(nets):
        net.state_dict()[COUNTER].fill_(i)
    average = copy.deepcopy(nets[0])
    for n, net in enumerate(nets, start=1):
        _follow(average, net, 1.0 / n)
    states = [net.state_dict() for net in nets]
    mean = {k: sum(s[k] for s in states) / 3 for k, v in states[0].items() if v.is_floating_point()}
    for name, value in mean.items():
        torch.testing.assert_close(average.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert int(average.state_dict()[COUNTER]) == 2  # counters are the newest net's
    _follow(average, nets[0], 0.25)
    torch.testing.assert_close(average.head.weight, 0.75 * mean["head.weight"] + 0.25 * nets[0].head.weight)


def test_averaging_validates_and_keeps_the_averaged_net_and_leaves_training_itself_alone(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(LABELS)), 8)
    brightness = labels[:, None, None] * 800 + rng.random((len(labels), 32, 32)) * 400
    images = _cached(labels.tolist(), images=brightness.astype(np.uint16))
    # one step an epoch; the first epoch trains the head alone and is never averaged nor kept
    config = TrainConfig(arch="resnet18", epochs=3, image_size=32, batch_size=40, warmup_epochs=1, patience=9)

    def train(average_epochs: float) -> TrainResult:
        update = {"average_epochs": average_epochs}
        return train_candidate(
            config.model_copy(update=update), images, images, tmp_path / "c.pt", progress=False
        )

    plain, averaged = train(0.0), train(5.0)
    assert [e["train_loss"] for e in averaged.history] == [e["train_loss"] for e in plain.history]
    assert averaged.history[1] == plain.history[1]  # the mean of one fine-tuned step is that step
    assert averaged.history[2]["val_nll"] != plain.history[2]["val_nll"]  # the mean of two is not
    scores, _ = predict_scores(averaged.net, images)
    kept = averaged.history[averaged.best_epoch - 1]["val_nll"]
    assert nll(scores, labels, 1.0) == pytest.approx(kept, rel=1e-5)  # what was validated is kept
