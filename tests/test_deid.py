"""De-identification: stable keyed pseudonyms, no identifiers in what leaves ingest."""

from __future__ import annotations

import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr

from dicom_router.config import Settings
from dicom_router.dicom.deid import (
    age_years,
    deidentified_fields,
    load_key,
    pseudonym,
    scanner_id,
    site_id,
)
from tests.dicom_factory import dicom_dataset


def test_pseudonyms_are_stable_for_one_key_and_differ_across_keys() -> None:
    assert pseudonym(b"k1", "patient", "", "P-1") == pseudonym(b"k1", "patient", "", "P-1")
    assert pseudonym(b"k1", "patient", "", "P-1") != pseudonym(b"k2", "patient", "", "P-1")
    assert pseudonym(b"k1", "site", "X") != pseudonym(b"k1", "patient", "X")
    assert len(pseudonym(b"k1", "site", "X")) == 16


def test_the_key_is_generated_once_and_kept_private(settings: Settings) -> None:
    first = load_key(settings)
    path = settings.secrets_dir / "deid.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(settings) == first and len(first) == 64


def test_workers_that_start_together_all_get_the_one_key_that_is_kept(tmp_path: Path) -> None:
    """A pipeline's parallel ingest shards create the key at the same moment: none may fail, read a
    half-written file or go on with a key of its own."""
    for trial in range(20):
        settings = Settings(data_dir=tmp_path / str(trial))
        start = threading.Barrier(8)

        def first_use(_: int, settings: Settings = settings, start: threading.Barrier = start) -> bytes:
            start.wait()
            return load_key(settings)

        with ThreadPoolExecutor(8) as pool:
            keys = set(pool.map(first_use, range(8)))
        kept = (settings.secrets_dir / "deid.key").read_text().strip().encode()
        assert keys == {kept} and len(kept) == 64
        assert [p.name for p in settings.secrets_dir.iterdir()] == ["deid.key"]  # nothing left aside


def test_a_key_from_the_environment_wins(settings: Settings) -> None:
    configured = settings.model_copy(update={"deid_key": SecretStr("from-vault")})
    assert load_key(configured) == b"from-vault"
    assert not (settings.secrets_dir / "deid.key").exists()


def test_site_falls_back_to_station_and_scanner_uses_serial_or_station() -> None:
    key = b"k"
    with_institution = dicom_dataset(np.zeros((2, 2), np.uint16), InstitutionName="St Elsewhere")
    station_only = dicom_dataset(np.zeros((2, 2), np.uint16), StationName="St Elsewhere")
    assert site_id(key, with_institution) == site_id(key, station_only)
    assert site_id(key, dicom_dataset(np.zeros((2, 2), np.uint16))) is None
    a = dicom_dataset(
        np.zeros((2, 2), np.uint16), Manufacturer="V", ManufacturerModelName="M", StationName="S1"
    )
    b = dicom_dataset(
        np.zeros((2, 2), np.uint16), Manufacturer="V", ManufacturerModelName="M", StationName="S2"
    )
    c = dicom_dataset(
        np.zeros((2, 2), np.uint16),
        Manufacturer="V",
        ManufacturerModelName="M",
        StationName="S1",
        DeviceSerialNumber="9",
    )
    assert len({scanner_id(key, a), scanner_id(key, b), scanner_id(key, c)}) == 3


@pytest.mark.parametrize(
    ("elements", "expected"),
    [
        ({"PatientAge": "045Y"}, 45.0),
        ({"PatientAge": "018M"}, 1.5),
        ({"PatientAge": "014D"}, 0.0),
        ({"PatientAge": "097Y"}, 90.0),
        ({"PatientAge": "030M"}, 2.0),
        ({"PatientBirthDate": "20100615", "StudyDate": "20200614"}, 9.0),
        ({"PatientBirthDate": "20100615", "StudyDate": "20200615"}, 10.0),
        ({"PatientBirthDate": "20200115", "StudyDate": "20200714"}, 0.4167),  # 5 whole months
        ({"PatientBirthDate": "20200115", "StudyDate": "20200715"}, 0.5),
        ({}, None),
    ],
)
def test_age_is_whole_years_or_under_two_whole_months_and_capped(
    elements: dict[str, Any], expected: float | None
) -> None:
    assert age_years(dicom_dataset(np.zeros((2, 2), np.uint16), **elements)) == expected


def test_deidentified_fields_hold_no_identifier() -> None:
    ds = dicom_dataset(
        np.zeros((2, 2), np.uint16),
        PatientName="DOE^JANE",
        PatientBirthDate="19700101",
        AccessionNumber="ACC123456",
        OtherPatientIDs="OTHER-77",
        InstitutionName="Mercy General",
        PatientAge="053Y",
    )
    fields = deidentified_fields(b"k", ds)
    text = repr(fields)
    for identifier in (
        "DOE",
        "JANE",
        "19700101",
        "ACC123456",
        "OTHER-77",
        "TEST-001",
        "Mercy",
        ds.SOPInstanceUID,
    ):
        assert identifier not in text
    assert fields["age_years"] == 53.0 and fields["patient_hash"] and fields["sop_uid_hash"]
