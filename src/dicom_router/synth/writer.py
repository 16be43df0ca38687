"""Write a synthetic multi-site X-ray archive: Part-10 DICOM files and ``labels.csv``.

The pipeline per image is phantom (``phantoms``) → simulated detector of the site's profile (gamma,
contrast, exposure-dependent quantum noise, detector blur, heel effect, padding, burned-in marker) →
quantization to the profile's bit depth, inverted for MONOCHROME1 → encoding in the profile's transfer
syntax. Headers carry synthetic PHI for de-identification to remove and no hint of the label
(``BodyPartExamined`` empty, ``StudyDescription`` "XR"). Every random draw comes from the seed, UIDs
included, so a seed names one archive byte for byte.
"""

from __future__ import annotations

import csv
import hashlib
import math
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from rich.console import Console
from rich.progress import track

from dicom_router import LABELS
from dicom_router.synth.phantoms import FloatArray, render_view
from dicom_router.synth.profiles import PROFILES, SiteProfile

LABEL_MIX: dict[str, float] = {
    "adult_chest": 0.35,
    "spine": 0.25,
    "others": 0.20,
    "abdominal": 0.12,
    "pediatric_chest": 0.08,
}
"""Share of each label: imbalanced like a real archive, every label present from ten images on."""

_IMAGES_PER_PATIENT = ((1, 2, 3), (0.6, 0.3, 0.1))
_MARKER_GLYPHS = {
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
}
"""5x7 bitmaps of the lead side markers technologists put on the cassette."""


@dataclass(frozen=True)
class SynthRecord:
    """One written file: ``file`` relative to the output folder (POSIX), its label and site."""

    file: str
    label: str
    site: str


@dataclass(frozen=True)
class _Patient:
    index: int
    label: str
    site: int
    sex: str
    age_years: int
    birth_date: date
    study_date: date
    study_minute: int
    """Minutes after midnight the study started."""


@dataclass(frozen=True)
class _Shot:
    index: int
    patient: _Patient
    instance: int


def _label_counts(n: int) -> dict[str, int]:
    """Largest-remainder split of ``n`` by ``LABEL_MIX``, moving images so every label gets one if it can."""
    exact = {label: n * share for label, share in LABEL_MIX.items()}
    counts = {label: math.floor(x) for label, x in exact.items()}
    by_remainder = sorted(LABEL_MIX, key=lambda label: (-(exact[label] - counts[label]), LABELS.index(label)))
    for label in by_remainder[: n - sum(counts.values())]:
        counts[label] += 1
    for label in LABELS:
        if counts[label] == 0 and n >= len(LABELS):
            counts[max(counts, key=counts.__getitem__)] -= 1
            counts[label] = 1
    return counts


def _new_patient(index: int, label: str, site: int, rng: np.random.Generator) -> _Patient:
    if label == "pediatric_chest":
        age = int(rng.integers(1, 13))
    else:
        age = int(np.clip(rng.normal(56.0, 17.0), 18, 92))
    study = date(2019, 1, 1) + timedelta(days=int(rng.integers(0, 6 * 365)))
    birthday_this_year = date(study.year - age, study.month, min(study.day, 28))
    return _Patient(
        index=index,
        label=label,
        site=site,
        sex=str(rng.choice(["F", "M"])),
        age_years=age,
        birth_date=birthday_this_year - timedelta(days=int(rng.integers(1, 360))),
        study_date=study,
        study_minute=int(rng.integers(7 * 60, 19 * 60)),
    )


def _plan(n: int, seed: int, n_sites: int) -> list[_Shot]:
    """Who is imaged, for what, where: patients of 1-3 images each, shuffled, sites taken in turn.

    Draws nothing that depends on the profiles, so one seed gives the same anatomy at every site.
    """
    rng = np.random.default_rng([seed])
    groups: list[tuple[str, int]] = []
    for label, count in _label_counts(n).items():
        left = count
        while left > 0:
            size = min(left, int(rng.choice(_IMAGES_PER_PATIENT[0], p=_IMAGES_PER_PATIENT[1])))
            groups.append((label, size))
            left -= size
    shots: list[_Shot] = []
    for p, g in enumerate(rng.permutation(len(groups))):
        label, size = groups[int(g)]
        patient = _new_patient(p, label, p % n_sites, rng)
        shots.extend(_Shot(len(shots), patient, k + 1) for k in range(size))
    return shots


def _image_shape(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    """Mostly portrait (about 5:4), sometimes near square or landscape, long side exact."""
    kind, ratio = rng.random(), rng.uniform(1.15, 1.3)
    if kind < 0.65:
        return long_side, round(long_side / ratio)
    if kind < 0.8:
        return long_side, round(long_side / (1.0 + (ratio - 1.15) / 3.0))
    return round(long_side / ratio), long_side


def _soften(image: FloatArray) -> None:
    """In-place [1, 2, 1] / 4 blur along both axes: the detector's point spread, correlating the noise."""
    for axis in (0, 1):
        body = [slice(None), slice(None)]
        prev, nxt = list(body), list(body)
        body[axis], prev[axis], nxt[axis] = slice(1, -1), slice(None, -2), slice(2, None)
        image[tuple(body)] = 0.5 * image[tuple(body)] + 0.25 * (image[tuple(prev)] + image[tuple(nxt)])


def _expose(phantom: FloatArray, profile: SiteProfile, rng: np.random.Generator, dose: float) -> FloatArray:
    """Phantom → detector signal in display convention (bright = attenuating), in [0, 1].

    ``dose`` is the exposure relative to the profile's nominal one: quantum noise grows as it falls,
    and more behind dense anatomy, where fewer photons arrive.
    """
    image = (0.5 + profile.contrast * (np.power(phantom, profile.gamma) - 0.5)).astype(np.float32)
    rows, cols = image.shape
    heel = rng.uniform(-0.04, 0.04)
    if rng.random() < 0.5:
        image += heel * np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    else:
        image += heel * np.linspace(-1.0, 1.0, cols, dtype=np.float32)[None, :]
    sigma = np.float32(profile.noise / math.sqrt(dose)) * (0.6 + 0.8 * np.clip(image, 0.0, 1.0))
    image += sigma * rng.standard_normal(image.shape, dtype=np.float32)
    _soften(image)
    return np.clip(image, 0.0, 1.0)


def _burn_marker(image: FloatArray, rng: np.random.Generator, inside: tuple[int, int, int, int]) -> None:
    """A bright R (image left) or L (image right) near the top of the exposed field."""
    top, _, left, right = inside
    rows, cols = image.shape
    letter = "R" if rng.random() < 0.5 else "L"
    glyph = np.array([[ch == "#" for ch in line] for line in _MARKER_GLYPHS[letter]], dtype=np.float32)
    k = max(1, round(0.045 * rows / 7))
    mark = np.kron(glyph, np.ones((k, k), np.float32))
    h, w = mark.shape
    margin = max(2, round(0.04 * min(rows, cols)))
    r0 = top + margin
    c0 = left + margin if letter == "R" else cols - right - margin - w
    if r0 < 0 or c0 < 0 or r0 + h > rows or c0 + w > cols:
        return
    patch = image[r0 : r0 + h, c0 : c0 + w]
    np.maximum(patch, 0.97 * mark, out=patch)


def _padding_border(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Widths (top, bottom, left, right) of the band outside the plate that a CR reader pads."""
    rows, cols = shape
    return (
        int(rng.integers(1, max(2, rows // 16))),
        int(rng.integers(1, max(2, rows // 16))),
        int(rng.integers(1, max(2, cols // 16))),
        int(rng.integers(1, max(2, cols // 16))),
    )


def _quantize(
    image: FloatArray, profile: SiteProfile, border: tuple[int, int, int, int] | None
) -> tuple[NDArray[np.uint8] | NDArray[np.uint16], int | None]:
    """Display values → stored values (inverted for MONOCHROME1) and the padding value, if any.

    Pixels of the image proper use 1 … max-1, so the padding value (stored black) is never anatomy.
    """
    top = (1 << profile.bits_stored) - 1
    levels = np.rint(image * (top - 2)).astype(np.int64) + 1
    stored = top - levels if profile.photometric == "MONOCHROME1" else levels
    pad_value: int | None = None
    if border is not None:
        pad_value = top if profile.photometric == "MONOCHROME1" else 0
        t, b, left, right = border
        rows, cols = stored.shape
        stored[:t] = pad_value
        stored[rows - b :] = pad_value
        stored[:, :left] = pad_value
        stored[:, cols - right :] = pad_value
    if profile.bits_allocated == 8:
        return stored.astype(np.uint8), pad_value
    return stored.astype(np.uint16), pad_value


def _ds_number(value: float) -> str:
    """A DS value that fits the 16-character limit."""
    return f"{value:.6g}"


def _uid(seed: int, site: str, kind: str, index: int) -> str:
    """A UUID-derived ``2.25`` UID fixed by its inputs (``generate_uid(prefix=None)`` would be random)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'dicom-router-synth/{seed}/{site}/{kind}/{index}').int}"


def _patient_tags(ds: Dataset, patient: _Patient, profile: SiteProfile, seed: int) -> None:
    """Synthetic PHI: everything de-identification has to remove or pseudonymize."""
    digest = hashlib.sha256(f"{seed}:{profile.name}:{patient.index}".encode()).hexdigest()
    ds.PatientName = f"SYNTH^PATIENT{patient.index:04d}"
    ds.PatientID = f"SYN{digest[:8].upper()}"
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{patient.age_years:03d}Y"
    ds.AccessionNumber = f"A{int(digest[8:16], 16) % 10**8:08d}"
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.OperatorsName = "SYNTH^TECHNOLOGIST"
    ds.StudyID = digest[16:22].upper()


def _dataset(
    shot: _Shot, profile: SiteProfile, seed: int, view: str, rng: np.random.Generator
) -> tuple[Dataset, float]:
    """Every header attribute but the pixel module; also the exposure relative to the nominal one."""
    patient = shot.patient
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = profile.sop_class_uid
    ds.SOPInstanceUID = _uid(seed, profile.name, "sop", shot.index)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = _uid(seed, profile.name, "study", patient.index)
    ds.SeriesInstanceUID = _uid(seed, profile.name, "series", patient.index)
    study_date = patient.study_date.strftime("%Y%m%d")
    start = patient.study_minute
    taken = start + 2 * (shot.instance - 1)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = f"{start // 60:02d}{start % 60:02d}00"
    ds.ContentTime = f"{taken // 60:02d}{taken % 60:02d}{int(rng.integers(0, 60)):02d}"
    ds.Modality = profile.modality
    if profile.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = profile.institution
    ds.StationName = profile.station
    ds.ManufacturerModelName = profile.model_name
    ds.DeviceSerialNumber = profile.serial
    ds.StudyDescription = "XR"
    ds.BodyPartExamined = ""
    ds.ViewPosition = view
    ds.SeriesNumber = 1
    ds.InstanceNumber = shot.instance
    _patient_tags(ds, patient, profile, seed)
    kvp = profile.kvp + float(rng.normal(0.0, 0.04 * profile.kvp))
    mas = profile.exposure_mas * float(rng.lognormal(0.0, 0.3))
    time_ms = max(1, round(float(rng.uniform(5.0, 40.0)) * mas / profile.exposure_mas))
    ds.KVP = _ds_number(round(kvp))
    ds.ExposureTime = time_ms
    ds.XRayTubeCurrent = max(1, round(1000.0 * mas / time_ms))
    ds.Exposure = max(1, round(mas))
    ds.ExposureInuAs = round(1000.0 * mas)
    spacing = [_ds_number(profile.pixel_spacing_mm)] * 2
    ds.ImagerPixelSpacing = spacing
    ds.PixelSpacing = spacing
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds, mas / profile.exposure_mas


def _voi_and_modality_lut(
    ds: Dataset, stored: NDArray[np.uint8] | NDArray[np.uint16], profile: SiteProfile, pad_value: int | None
) -> None:
    """Rescale and window attributes the profile asks for; the window spans the anatomy's 1st-99th centile."""
    slope, intercept = (0.5, -float(1 << (profile.bits_stored - 2))) if profile.rescale else (1.0, 0.0)
    if profile.rescale:
        ds.RescaleSlope = _ds_number(slope)
        ds.RescaleIntercept = _ds_number(intercept)
        ds.RescaleType = "US"
    if profile.window:
        values = stored[stored != pad_value] if pad_value is not None else stored
        lo, hi = np.percentile(values if values.size else stored, [1.0, 99.0])
        ds.WindowCenter = _ds_number(slope * (lo + hi) / 2.0 + intercept)
        ds.WindowWidth = _ds_number(max(slope * (hi - lo) * 1.1, 1.0))
    if pad_value is not None:
        ds.PixelPaddingValue = pad_value


def _write(
    shot: _Shot, profile: SiteProfile, seed: int, long_side: int, path: Path, *, variety: bool
) -> None:
    phantom_rng = np.random.default_rng([seed, shot.index, 0])
    detector_rng = np.random.default_rng([seed, shot.index, 1])
    shape = _image_shape(phantom_rng, long_side)
    phantom, view = render_view(shot.patient.label, phantom_rng, shape, variety=variety)
    ds, dose = _dataset(shot, profile, seed, view, detector_rng)
    image = _expose(phantom, profile, detector_rng, dose)
    border = _padding_border(detector_rng, shape) if profile.padding else None
    if profile.burned_in_marker:
        _burn_marker(image, detector_rng, border or (0, 0, 0, 0))
    stored, pad_value = _quantize(image, profile, border)
    ds.set_pixel_data(stored, profile.photometric, profile.bits_stored, generate_instance_uid=False)
    _voi_and_modality_lut(ds, stored, profile, pad_value)
    if profile.transfer_syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(profile.transfer_syntax, stored, generate_instance_uid=False)
    elif profile.transfer_syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def _profiles_for(sites: int, site_profile: str | None) -> list[SiteProfile]:
    if site_profile is not None:
        if site_profile not in PROFILES:
            raise ValueError(f"unknown site profile {site_profile!r}; known: {', '.join(PROFILES)}")
        return [PROFILES[site_profile]]
    if not 1 <= sites <= len(PROFILES):
        raise ValueError(f"sites must be between 1 and {len(PROFILES)}, got {sites}")
    return list(PROFILES.values())[:sites]


def synthesize(
    out_dir: Path,
    n: int,
    *,
    sites: int = 3,
    seed: int = 0,
    site_profile: str | None = None,
    long_side_px: int | None = None,
    variety: bool = False,
    progress: bool = False,
) -> list[SynthRecord]:
    """Write ``n`` labelled synthetic X-rays as ``out_dir/<site>/<NNNN>.dcm`` plus ``out_dir/labels.csv``.

    Images come from the first ``sites`` profiles in turn (one per patient), or all from
    ``site_profile``. ``long_side_px`` replaces every profile's image size (tiny for tests, full
    detector size for benchmarks). ``variety`` adds the views real archives hold (``phantoms.VARIETY``:
    lateral chests, cervical spines, pelvis, densitometry, contrast studies ...). The same arguments
    always give the same bytes; use different seeds for disjoint data sets.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if long_side_px is not None and long_side_px < 16:
        raise ValueError(f"long_side_px must be >= 16, got {long_side_px}")
    profiles = _profiles_for(sites, site_profile)
    shots = _plan(n, seed, len(profiles))
    out_dir.mkdir(parents=True, exist_ok=True)
    for profile in {profiles[shot.patient.site].name: profiles[shot.patient.site] for shot in shots}.values():
        (out_dir / profile.name).mkdir(exist_ok=True)
    records: list[SynthRecord] = []
    for shot in track(shots, description="synthesizing", disable=not progress, console=Console(stderr=True)):
        profile = profiles[shot.patient.site]
        file = f"{profile.name}/{shot.index:04d}.dcm"
        _write(shot, profile, seed, long_side_px or profile.long_side_px, out_dir / file, variety=variety)
        records.append(SynthRecord(file=file, label=shot.patient.label, site=profile.name))
    with (out_dir / "labels.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", "label", "site"])
        writer.writerows((r.file, r.label, r.site) for r in records)
    return records


def new_equipment_at(
    site: str,
    out_dir: Path,
    n: int,
    *,
    equipment: str = "site-new",
    seed: int = 0,
    long_side_px: int | None = None,
) -> list[SynthRecord]:
    """A known ``site`` installs another vendor's detector: ``equipment``'s images and headers under the
    site's InstitutionName (same ``site_id``, a new ``scanner_id``): the drift a monitor must catch."""
    records = synthesize(out_dir, n, seed=seed, site_profile=equipment, long_side_px=long_side_px)
    for record in records:
        ds = dcmread(out_dir / record.file)
        ds.InstitutionName = PROFILES[site].institution
        ds.save_as(out_dir / record.file)
    return records
