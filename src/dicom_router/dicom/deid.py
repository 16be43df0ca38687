"""De-identification: keyed-hash pseudonyms and the header fields that may leave ingest.

Pseudonyms are HMAC-SHA256 under a per-deployment key, so they are stable across runs (the same
patient or scanner always maps to the same id) yet cannot be reversed or recomputed without the key.
Names, IDs, birth dates, accession numbers and free text never leave this module.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from collections.abc import MutableSequence
from datetime import date
from typing import Any

from pydicom.dataset import Dataset

from dicom_router.config import Settings

PSEUDONYM_HEX = 16
"""64 bits: collision-free for any archive size this routes, short enough to read in a table."""
AGE_CAP_YEARS = 90.0
"""HIPAA Safe Harbor: ages over 89 are reported as 90."""


def load_key(settings: Settings) -> bytes:
    """The deployment's pseudonym key: from settings, else generated once and kept in ``secrets_dir``."""
    if settings.deid_key is not None:
        return settings.deid_key.get_secret_value().encode()
    return settings.stored_secret("deid.key", lambda: secrets.token_hex(32) + "\n").strip().encode()


def pseudonym(key: bytes, kind: str, *parts: str) -> str:
    """Keyed hash of ``parts`` in namespace ``kind`` (a site and a patient with equal text differ)."""
    message = "\x1f".join((kind, *parts)).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def site_id(key: bytes, ds: Dataset) -> str | None:
    """Keyed hash of InstitutionName (fallback StationName), as the contract defines it."""
    name = _text(ds, "InstitutionName") or _text(ds, "StationName")
    return pseudonym(key, "site", name.upper()) if name else None


def scanner_id(key: bytes, ds: Dataset) -> str | None:
    """Keyed hash of (Manufacturer, ManufacturerModelName, DeviceSerialNumber or StationName)."""
    parts = (
        _text(ds, "Manufacturer").upper(),
        _text(ds, "ManufacturerModelName").upper(),
        (_text(ds, "DeviceSerialNumber") or _text(ds, "StationName")).upper(),
    )
    return pseudonym(key, "scanner", *parts) if any(parts) else None


def uid_hash(key: bytes, ds: Dataset, keyword: str) -> str | None:
    uid = _text(ds, keyword)
    return pseudonym(key, keyword, uid) if uid else None


def patient_hash(key: bytes, ds: Dataset) -> str | None:
    """Keyed hash of PatientID qualified by its issuer (IDs repeat across hospitals)."""
    pid = _text(ds, "PatientID")
    return pseudonym(key, "patient", _text(ds, "IssuerOfPatientID"), pid) if pid else None


_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def age_years(ds: Dataset) -> float | None:
    """PatientAge (AS), else the age between birth and study date; coarsened by ``coarse_age``."""
    match = _AGE.match(_text(ds, "PatientAge").upper())
    if match:
        years = int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)]
    else:
        born, seen = _da(_text(ds, "PatientBirthDate")), _da(_text(ds, "StudyDate"))
        if born is None or seen is None or seen < born:
            return None
        months = (seen.year - born.year) * 12 + seen.month - born.month - (seen.day < born.day)
        years = months / 12
    return coarse_age(years)


def coarse_age(years: float) -> float:
    """Whole years (capped at 90), whole months under 2: an exact age of an infant is nearly its birth
    date, and a birth date with the study date identifies a patient."""
    if years >= 2:
        return float(min(math.floor(years), AGE_CAP_YEARS))
    return round(math.floor(years * 12 + 1e-9) / 12, 4)


def _da(value: str) -> date | None:
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8])) if len(value) >= 8 else None
    except ValueError:
        return None


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def pixel_spacing_mm(ds: Dataset) -> float | None:
    """Mean of the row and column spacing: PixelSpacing, else ImagerPixelSpacing (detector plane)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            spacing = [float(v) for v in value] if value else []
        except (TypeError, ValueError):
            continue
        if spacing and all(s > 0 for s in spacing):
            return sum(spacing) / len(spacing)
    return None


def acquisition_fields(ds: Dataset) -> dict[str, Any]:
    """Header facts that identify nobody: what training, drift monitoring and fusion models use."""
    frames = ds.get("NumberOfFrames")
    return {
        "sop_class": _text(ds, "SOPClassUID"),
        "modality": _text(ds, "Modality"),
        "manufacturer": _text(ds, "Manufacturer"),
        "model_name": _text(ds, "ManufacturerModelName"),
        "rows": int(ds.Rows) if ds.get("Rows") else None,
        "columns": int(ds.Columns) if ds.get("Columns") else None,
        "bits_stored": int(ds.BitsStored) if ds.get("BitsStored") else None,
        "frames": int(frames) if frames else 1,
        "photometric": _text(ds, "PhotometricInterpretation"),
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")),
        "pixel_spacing": pixel_spacing_mm(ds),
        "kvp": _number(ds, "KVP"),
        "exposure": _number(ds, "Exposure"),
        "view_position": _text(ds, "ViewPosition"),
        "body_part_examined": body_part_examined(ds),
        "sex": _text(ds, "PatientSex").upper()[:1] or None,
        "age_years": age_years(ds),
    }


_CODE_STRING = re.compile(r"^[A-Z0-9 _]{1,16}$")


def body_part_examined(ds: Dataset) -> str | None:
    """BodyPartExamined when it is a code string (CS: upper case, digits, space, underscore, at most 16
    characters); anything else is free text a site typed, which may identify someone, and is dropped."""
    value = _text(ds, "BodyPartExamined").upper()
    return value if _CODE_STRING.match(value) else None


PHI_TAGS: dict[str, str] = {
    "PatientName": "dropped",
    "PatientID": "pseudonymised (patient_hash)",
    "IssuerOfPatientID": "pseudonymised (patient_hash)",
    "OtherPatientIDs": "dropped",
    "OtherPatientIDsSequence": "dropped",
    "OtherPatientNames": "dropped",
    "PatientBirthName": "dropped",
    "PatientMotherBirthName": "dropped",
    "PatientBirthDate": "coarsened (age_years)",
    "PatientBirthTime": "dropped",
    "PatientAge": "coarsened (age_years)",
    "PatientAddress": "dropped",
    "PatientTelephoneNumbers": "dropped",
    "MedicalRecordLocator": "dropped",
    "Occupation": "dropped",
    "AdditionalPatientHistory": "dropped",
    "PatientComments": "dropped",
    "AccessionNumber": "dropped",
    "StudyID": "dropped",
    "StudyDate": "coarsened (age_years)",
    "StudyTime": "dropped",
    "SeriesDate": "dropped",
    "AcquisitionDate": "dropped",
    "ContentDate": "dropped",
    "AcquisitionDateTime": "dropped",
    "StudyInstanceUID": "pseudonymised (study_uid_hash)",
    "SeriesInstanceUID": "pseudonymised (series_uid_hash)",
    "SOPInstanceUID": "pseudonymised (sop_uid_hash)",
    "FrameOfReferenceUID": "dropped",
    "InstitutionName": "pseudonymised (site_id)",
    "InstitutionAddress": "dropped",
    "InstitutionalDepartmentName": "dropped",
    "StationName": "pseudonymised (site_id, scanner_id)",
    "DeviceSerialNumber": "pseudonymised (scanner_id)",
    "ReferringPhysicianName": "dropped",
    "ReferringPhysicianAddress": "dropped",
    "PerformingPhysicianName": "dropped",
    "NameOfPhysiciansReadingStudy": "dropped",
    "PhysiciansOfRecord": "dropped",
    "RequestingPhysician": "dropped",
    "OperatorsName": "dropped",
    "StudyDescription": "dropped",
    "SeriesDescription": "dropped",
    "RequestedProcedureDescription": "dropped",
    "PerformedProcedureStepDescription": "dropped",
    "ImageComments": "dropped",
    "RequestAttributesSequence": "dropped",
}
"""Header elements that can identify a patient (after DICOM PS3.15's Basic Application Level
Confidentiality Profile), each with what the catalog keeps of it: a keyed pseudonym, a coarsened age, or
nothing."""
PRIVATE_ELEMENTS = "(private elements)"
"""The de-identification audit's name for a source object that carries private (vendor) elements:
they may hold anything, and the catalog keeps none of them."""
BURNED_IN = "BurnedInAnnotation"
"""Listed when the source says YES: text in the pixels, which header de-identification cannot remove."""


def _has_value(value: Any) -> bool:
    if isinstance(value, MutableSequence):  # a sequence, or a multi-valued element
        return len(value) > 0
    return value is not None and bool(str(value).strip())


def phi_tags(ds: Dataset) -> list[str]:
    """Which PHI-bearing elements this source object carries with a value (names only, never values):
    the input of the de-identification audit."""
    present = [keyword for keyword in PHI_TAGS if _has_value(ds.get(keyword))]
    if any(element.tag.is_private for element in ds):
        present.append(PRIVATE_ELEMENTS)
    if _text(ds, BURNED_IN).upper() == "YES":
        present.append(BURNED_IN)
    return present


def deidentified_fields(key: bytes, ds: Dataset) -> dict[str, Any]:
    """Every header field of a catalog row: keyed pseudonyms plus the acquisition facts."""
    return {
        "sop_uid_hash": uid_hash(key, ds, "SOPInstanceUID"),
        "study_uid_hash": uid_hash(key, ds, "StudyInstanceUID"),
        "series_uid_hash": uid_hash(key, ds, "SeriesInstanceUID"),
        "patient_hash": patient_hash(key, ds),
        "site_id": site_id(key, ds),
        "scanner_id": scanner_id(key, ds),
        **acquisition_fields(ds),
    }
