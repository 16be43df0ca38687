"""The synthetic archive: deterministic, decodable, labelled, multi-site, with PHI to remove."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_router import LABELS
from dicom_router.synth import PROFILES, SynthRecord, list_profiles, render_phantom, render_view, synthesize
from dicom_router.synth.phantoms import _DRAWERS, VARIETY, Drawer, _Canvas
from dicom_router.synth.profiles import CR_IMAGE_STORAGE, DX_IMAGE_STORAGE_FOR_PRESENTATION
from dicom_router.synth.writer import _label_counts

SMALL = 64


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SynthRecord]]:
    """One small archive over every profile, shared by the read-only checks."""
    out = tmp_path_factory.mktemp("archive")
    return out, synthesize(out, 20, sites=len(PROFILES), seed=7, long_side_px=SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", 10, sites=len(PROFILES), seed=3, long_side_px=SMALL)
    synthesize(tmp_path / "b", 10, sites=len(PROFILES), seed=3, long_side_px=SMALL)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 11
    assert first == second


def test_different_seed_gives_different_files(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", 10, seed=3, long_side_px=SMALL)
    synthesize(tmp_path / "b", 10, seed=4, long_side_px=SMALL)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    shared = set(first) & set(second) - {"labels.csv"}
    assert shared
    assert all(first[name] != second[name] for name in shared)


def test_labels_csv_lists_every_file_with_its_label_and_site(archive: tuple[Path, list[SynthRecord]]) -> None:
    root, records = archive
    with (root / "labels.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["file", "label", "site"]
        rows = list(reader)
    assert [(r["file"], r["label"], r["site"]) for r in rows] == [(r.file, r.label, r.site) for r in records]
    for row in rows:
        assert (root / row["file"]).is_file()
        assert row["file"].startswith(f"{row['site']}/")
        assert row["label"] in LABELS


def test_every_file_decodes_with_its_profiles_transfer_syntax_and_bit_depth(
    archive: tuple[Path, list[SynthRecord]],
) -> None:
    root, records = archive
    assert {r.site for r in records} == set(PROFILES)
    for record in records:
        profile = PROFILES[record.site]
        ds = pydicom.dcmread(root / record.file)
        assert ds.file_meta.TransferSyntaxUID == profile.transfer_syntax
        assert ds.SOPClassUID == (
            CR_IMAGE_STORAGE if profile.modality == "CR" else DX_IMAGE_STORAGE_FOR_PRESENTATION
        )
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == profile.modality
        assert ds.PhotometricInterpretation == profile.photometric
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (
            profile.bits_allocated,
            profile.bits_stored,
            profile.bits_stored - 1,
        )
        assert (ds.SamplesPerPixel, ds.PixelRepresentation) == (1, 0)
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns)
        assert int(pixels.max()) < 2**profile.bits_stored
        assert pixels.std() > 0
        assert ("WindowCenter" in ds) == profile.window
        assert ("RescaleSlope" in ds) == profile.rescale
        assert ("PixelPaddingValue" in ds) == profile.padding
        if profile.padding:
            assert pixels[0, 0] == ds.PixelPaddingValue


@pytest.mark.parametrize("n", [10, 11, 12, 13, 37, 200, 1001])
def test_every_label_is_present_from_ten_images_on(n: int) -> None:
    counts = _label_counts(n)
    assert sum(counts.values()) == n
    assert all(counts[label] >= 1 for label in LABELS)
    assert counts["adult_chest"] == max(counts.values())
    assert counts["pediatric_chest"] == min(counts.values())


def test_a_ten_image_archive_holds_every_label(tmp_path: Path) -> None:
    records = synthesize(tmp_path, 10, seed=11, long_side_px=SMALL)
    assert {r.label for r in records} == set(LABELS)


def test_monochrome1_stores_inverted_pixels(tmp_path: Path) -> None:
    mono2 = synthesize(tmp_path / "mono2", 10, seed=5, site_profile="site-a", long_side_px=128)
    mono1 = synthesize(tmp_path / "mono1", 10, seed=5, site_profile="site-b", long_side_px=128)
    assert PROFILES["site-a"].photometric == "MONOCHROME2"
    assert PROFILES["site-b"].photometric == "MONOCHROME1"
    chests = 0
    for a, b in zip(mono2, mono1, strict=True):
        assert a.label == b.label
        ds2, ds1 = pydicom.dcmread(tmp_path / "mono2" / a.file), pydicom.dcmread(tmp_path / "mono1" / b.file)
        p2, p1 = ds2.pixel_array.astype(np.float64), ds1.pixel_array.astype(np.float64)
        exposed = p1 != ds1.PixelPaddingValue
        assert np.corrcoef(p2[exposed], p1[exposed])[0, 1] < -0.8
        if a.label == "adult_chest":
            chests += 1
            rows, cols = p2.shape
            band = slice(int(0.3 * rows), int(0.5 * rows))
            center = slice(int(0.46 * cols), int(0.54 * cols))
            lungs = np.r_[int(0.22 * cols) : int(0.32 * cols), int(0.68 * cols) : int(0.78 * cols)]
            assert p2[band, center].mean() > p2[band][:, lungs].mean()
            assert p1[band, center].mean() < p1[band][:, lungs].mean()
    assert chests >= 2


def test_unknown_profile_raises_value_error_naming_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"site-a.*site-new"):
        synthesize(tmp_path, 1, site_profile="nowhere")
    assert not (tmp_path / "labels.csv").exists()


def test_out_of_range_arguments_raise_value_error(tmp_path: Path) -> None:
    calls: list[Callable[[], object]] = [
        lambda: synthesize(tmp_path, -1),
        lambda: synthesize(tmp_path, 1, sites=0),
        lambda: synthesize(tmp_path, 1, sites=len(PROFILES) + 1),
        lambda: synthesize(tmp_path, 1, seed=-1),
        lambda: synthesize(tmp_path, 1, long_side_px=4),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()


def test_site_profile_puts_every_image_at_that_site(tmp_path: Path) -> None:
    records = synthesize(tmp_path, 6, sites=2, site_profile="site-new", long_side_px=SMALL)
    profile = PROFILES["site-new"]
    assert {r.site for r in records} == {"site-new"}
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["site-new"]
    for record in records:
        ds = pydicom.dcmread(tmp_path / record.file, stop_before_pixels=True)
        assert (ds.InstitutionName, ds.Manufacturer, ds.DeviceSerialNumber) == (
            profile.institution,
            profile.manufacturer,
            profile.serial,
        )


def test_headers_carry_phi_but_no_label_hint(archive: tuple[Path, list[SynthRecord]]) -> None:
    root, records = archive
    for record in records:
        ds = pydicom.dcmread(root / record.file, stop_before_pixels=True)
        assert re.fullmatch(r"SYNTH\^PATIENT\d{4}", str(ds.PatientName))
        assert ds.PatientID and ds.AccessionNumber
        assert re.fullmatch(r"\d{8}", ds.PatientBirthDate)
        assert ds.PatientSex in {"F", "M"}
        age_match = re.fullmatch(r"(\d{3})Y", ds.PatientAge)
        assert age_match is not None
        age = int(age_match[1])
        assert 1 <= age <= 12 if record.label == "pediatric_chest" else age >= 18
        assert int(ds.StudyDate[:4]) - int(ds.PatientBirthDate[:4]) in {age, age + 1}
        assert ds.InstitutionName and ds.StationName and ds.ManufacturerModelName
        assert float(ds.KVP) > 0 and ds.Exposure > 0 and ds.ExposureInuAs > 0
        assert ds.ViewPosition in {"PA", "AP", "LL"}
        assert len(ds.PixelSpacing) == 2 and len(ds.ImagerPixelSpacing) == 2
        assert ds.BodyPartExamined == ""
        assert ds.StudyDescription == "XR"


def test_patients_have_one_to_three_images_in_one_study(archive: tuple[Path, list[SynthRecord]]) -> None:
    root, records = archive
    studies: dict[str, set[str]] = defaultdict(set)
    images: dict[str, int] = defaultdict(int)
    sop_uids = set()
    for record in records:
        ds = pydicom.dcmread(root / record.file, stop_before_pixels=True)
        studies[ds.PatientID].add(ds.StudyInstanceUID)
        images[ds.PatientID] += 1
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == len(records)
    assert all(len(uids) == 1 for uids in studies.values())
    assert set(images.values()) <= {1, 2, 3}
    assert max(images.values()) > 1


def test_long_side_px_sets_the_image_long_side(tmp_path: Path) -> None:
    for record in synthesize(tmp_path / "small", 5, seed=2, long_side_px=48):
        ds = pydicom.dcmread(tmp_path / "small" / record.file, stop_before_pixels=True)
        assert max(ds.Rows, ds.Columns) == 48
    (record,) = synthesize(tmp_path / "default", 1, site_profile="site-c")
    ds = pydicom.dcmread(tmp_path / "default" / record.file, stop_before_pixels=True)
    assert max(ds.Rows, ds.Columns) == PROFILES["site-c"].long_side_px


@pytest.mark.parametrize("label", LABELS)
def test_render_phantom_gives_a_varied_unit_range_image_for_every_label(label: str) -> None:
    first = render_phantom(label, np.random.default_rng(0), (80, 64))
    second = render_phantom(label, np.random.default_rng(1), (80, 64))
    assert first.shape == (80, 64) and first.dtype == np.float32
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert first.std() > 0.05
    assert not np.array_equal(first, second)


def test_render_phantom_rejects_an_unknown_label() -> None:
    with pytest.raises(ValueError, match="adult_chest"):
        render_phantom("thorax", np.random.default_rng(0), (64, 64))


def test_profiles_span_different_equipment() -> None:
    profiles = list_profiles()
    assert len(profiles) >= 5 and "site-new" in PROFILES
    assert {p.modality for p in profiles} == {"CR", "DX"}
    assert {p.photometric for p in profiles} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({p.transfer_syntax for p in profiles}) == 4
    assert len({p.bits_stored for p in profiles}) >= 4
    assert len({p.manufacturer for p in profiles}) == len(profiles)
    assert len({p.institution for p in profiles}) == len(profiles)


@pytest.mark.parametrize(
    ("label", "drawer"),
    [(label, drawer) for label, extra in VARIETY.items() for drawer, _ in extra],
    ids=lambda x: getattr(x, "__name__", str(x)).strip("_"),
)
def test_every_variety_view_draws_a_varied_radiograph_with_its_view_position(
    label: str, drawer: Drawer
) -> None:
    images = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        canvas = _Canvas((96, 80), rng, _DRAWERS[label][1])
        view, flip = drawer(canvas, rng)
        assert view in {"AP", "PA", "LL"} and isinstance(flip, bool)
        images.append(canvas.compose())
    for image in images:
        assert image.std() > 0.05 and np.isfinite(image).all()
    assert not np.array_equal(images[0], images[1])


@pytest.mark.parametrize("label", ["adult_chest", "pediatric_chest"])
def test_variety_adds_lateral_chests_at_their_share_and_the_classic_set_has_none(label: str) -> None:
    def laterals(variety: bool) -> int:
        views = [
            render_view(label, np.random.default_rng(s), (64, 64), variety=variety)[1] for s in range(120)
        ]
        return views.count("LL")

    share = dict((d.__name__, s) for d, s in VARIETY[label])[f"_{label}_lateral"]
    assert laterals(variety=False) == 0
    assert abs(laterals(variety=True) / 120 - share) < 0.12


def test_a_variety_archive_is_deterministic_and_changes_only_labels_with_extra_views(tmp_path: Path) -> None:
    records = synthesize(tmp_path / "a", 16, seed=3, long_side_px=SMALL, variety=True)
    synthesize(tmp_path / "b", 16, seed=3, long_side_px=SMALL, variety=True)
    synthesize(tmp_path / "classic", 16, seed=3, long_side_px=SMALL)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")

    def same(record: SynthRecord) -> bool:
        a, classic = (pydicom.dcmread(tmp_path / d / record.file).pixel_array for d in ("a", "classic"))
        return bool(np.array_equal(a, classic))

    assert all(same(r) for r in records if r.label not in VARIETY)
    assert not all(same(r) for r in records if r.label in VARIETY)
