"""No PHI leaves ingest: a folder full of it goes through ingest, training, the bundle, MLflow, predict and
evaluate, then through Orthanc, the router, the model server, the inference log and drift, and no
identifying string is found in any output (logs, streams, catalog columns other than the object key,
bundle, MLflow store and artifacts, Orthanc metadata, router API, queue, inference log, reports)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_router import stack
from dicom_router.config import Settings
from dicom_router.monitoring.inference_log import read_inference_log
from dicom_router.synth import synthesize
from tests.conftest import run_cli, send, wait_for_queue

PHI = {
    "PatientName": "Doe^Jane Quincy",
    "PatientID": "MRN-7731-55",
    "OtherPatientIDs": "NHS-943-476-5919",
    "PatientBirthDate": "1961-03-04",  # malformed DA: pydicom would quote it in a warning
    "AccessionNumber": "ACC-99812-X",
    "PatientAddress": "12 Elm Street Springfield",
    "ReferringPhysicianName": "Welby^Marcus",
    "InstitutionName": "Saint Quincy Hospital",
    "ImageComments": "patient anxious, call daughter on 555-0199",
}
KEY_PHI = "Doe_Jane_MRN-7731-55"
"""Hospital exports name files after the patient: it is in every object key (allowed only in the
catalog's ``key`` column and the ingest QA, which locate the source objects)."""
NOTE_PHI = "lives with Jane Roe at 9 Oak Lane"


def _phi_folder(folder: Path) -> None:
    synthesize(folder, 24, sites=2, seed=41, long_side_px=48)
    rows = list(csv.DictReader((folder / "labels.csv").open()))
    for i, row in enumerate(rows):
        path = folder / row["file"]
        ds = pydicom.dcmread(path)
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        ds.PatientID = f"{PHI['PatientID']}{i:02d}"  # several patients, so the split can be made
        block = ds.private_block(0x0099, "HOSPITAL PHI", create=True)
        block.add_new(0x01, "LO", "SSN 078-05-1120")
        nested = Dataset()
        nested.PatientName = PHI["PatientName"]
        ds.ReferencedPatientSequence = pydicom.Sequence([nested])
        renamed = path.with_name(f"{KEY_PHI}_{path.name}")
        ds.save_as(renamed, enforce_file_format=True)
        path.unlink()
        row["file"] = renamed.relative_to(folder).as_posix()
        row["note"] = NOTE_PHI
    with (folder / "labels.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _strings() -> list[str]:
    found = [v for v in PHI.values()] + [KEY_PHI, NOTE_PHI, "078-05-1120", "Doe^Jane", "19610304"]
    return [s for s in found if s]


def _leaks(blob: bytes, where: str) -> list[str]:
    return [f"{where}: {s!r}" for s in _strings() if s.encode() in blob]


def test_a_phi_laden_folder_leaves_no_phi_in_any_output(settings: Settings, tmp_path: Path) -> None:
    data = tmp_path / "export"
    _phi_folder(data)
    catalog = tmp_path / "catalog.parquet"
    tiny = ["--arch", "resnet18", "--epochs", "1", "--image-size", "32", "--register"]
    commands = [
        ["ingest", str(data), "--catalog", str(catalog), "--labels", str(data / "labels.csv")],
        ["train", "--catalog", str(catalog), *tiny],
        ["promote", "--force"],
        ["predict", str(next(data.rglob("*.dcm"))), "--json"],
        ["evaluate", "--model", "models:/bodypart-router@champion", "--data", str(data), "--json"],
    ]
    leaks: list[str] = []
    for args in commands:
        result = run_cli(*args)
        assert result.returncode in (0, 2), f"{args[0]}: {result.stderr[-2000:]}"
        stdout = result.stdout
        if args[0] == "predict":  # predict names the file the user gave it: the path is theirs
            stdout = stdout.replace(str(next(data.rglob("*.dcm"))), "<file>")
        leaks += _leaks(stdout.encode(), f"{args[0]} stdout")
        leaks += _leaks(result.stderr.encode(), f"{args[0]} stderr")

    import pyarrow.parquet as pq

    table = pq.read_table(catalog).drop_columns(["key"])
    leaks += _leaks(table.to_pandas().astype(str).to_csv().encode(), "catalog (all columns but key)")
    for path in sorted(settings.data_dir.rglob("*")):  # MLflow store and artifacts, bundles, logs, cache
        if path.is_file() and "secrets" not in path.parts:
            leaks += _leaks(path.read_bytes(), str(path.relative_to(settings.data_dir)))
    assert leaks == []


@pytest.mark.usefixtures("routed_stack")
def test_phi_routed_through_orthanc_the_server_and_the_inference_log_reaches_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = tmp_path / "export"
    _phi_folder(export)
    broken = pydicom.dcmread(next(export.rglob("*.dcm")))  # PHI in a file the decoder must reject
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    broken.PixelData = b"\0" * 100
    broken.save_as(export / f"{KEY_PHI}_broken.dcm", enforce_file_format=True)
    log_prefix = str(tmp_path / "inference-log")
    monkeypatch.setenv("DICOM_ROUTER_INFERENCE_LOG_URI", log_prefix)
    monkeypatch.setenv("DICOM_ROUTER_INFERENCE_LOG_FLUSH_S", "1")
    settings = Settings()
    stack.router_up(settings)
    send(export, stack.orthanc_status(settings)["dicom_port"])
    wait_for_queue(settings, {"done": 25}, "the 25 instances routed")

    leaks: list[str] = []
    orthanc = stack.orthanc_client(settings)
    for instance in orthanc.instances():  # what the router wrote back to the archive
        leaks += _leaks(json.dumps(orthanc.metadata("instances", instance)).encode(), "Orthanc metadata")
    router_url = stack.router_status(settings)["url"]
    for endpoint in ("/health", "/metrics"):
        leaks += _leaks(httpx.get(router_url + endpoint).content, f"router {endpoint}")
    for args in (["route", "--dead-letter", "--json"], ["route", "--history", "--json"]):
        result = run_cli(*args)
        leaks += _leaks((result.stdout + result.stderr).encode(), " ".join(args[:2]))
    stack.Process("router", settings).stop()  # flushes the inference log
    assert len(read_inference_log(log_prefix, settings)) == 24  # the broken one has no prediction
    drift = run_cli("drift", "--reference", log_prefix, "--current", log_prefix, "--json")
    assert drift.returncode in (0, 3), drift.stderr[-2000:]
    leaks += _leaks((drift.stdout + drift.stderr).encode(), "drift streams")
    archives = {settings.data_dir / name / "storage" for name in ("orthanc", "destination")}
    stored = [p for a in archives for p in a.rglob("*") if p.is_file()]
    assert all(
        any(_leaks(p.read_bytes(), "") for p in stored if a in p.parents) for a in archives
    )  # PHI got in
    for root in (settings.data_dir, tmp_path / "inference-log"):  # logs, queue, reports, snapshots, log
        for path in sorted(root.rglob("*")):
            if path.is_file() and "secrets" not in path.parts and not archives & set(path.parents):
                leaks += _leaks(path.read_bytes(), str(path.relative_to(tmp_path)))
    assert leaks == []
