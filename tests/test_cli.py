"""The ``dicom-router`` command as outside checks use it: exit codes, stderr lines, JSON shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_router import __version__
from dicom_router.config import Settings
from tests.conftest import run_cli
from tests.dicom_factory import dicom_dataset

INSPECT_KEYS = {"file", "ok", "sop_class", "modality", "transfer_syntax", "photometric", "rows", "columns"}


def test_inspect_json_gives_one_document_for_a_folder_of_real_files(xray_real: Path) -> None:
    files = sorted(str(p) for p in (xray_real / "site-b").glob("*.dcm"))
    result = run_cli("inspect", *files, "--json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert len(records) == len(files) and all(r["ok"] for r in records)
    first = records[0]
    assert INSPECT_KEYS | {"bits_stored", "frames", "pixel"} <= set(first)
    assert set(first["pixel"]) == {"min", "max", "mean"}
    assert first["photometric"] == "MONOCHROME1" and first["modality"] == "CR"


def test_inspect_reports_corrupt_input_with_exit_2_and_keeps_the_good_ones(
    xray_real: Path, tmp_path: Path
) -> None:
    good = xray_real / "site-a" / "0000.dcm"
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:5000])
    text = tmp_path / "text.dcm"
    text.write_text("hello")
    result = run_cli("inspect", str(good), str(cut), str(text), "--json")
    assert result.returncode == 2
    records = json.loads(result.stdout)
    assert [r["ok"] for r in records] == [True, False, False]
    assert records[1]["error"]["type"] == "Truncated" and records[2]["error"]["type"] == "NotDicom"
    lines = result.stderr.strip().splitlines()
    assert f"{cut}: Truncated: " in "\n".join(lines) and any(
        line.startswith(f"{text}: NotDicom: ") for line in lines
    )


def test_inspect_prints_a_readable_line_per_file(xray_real: Path) -> None:
    result = run_cli("inspect", str(xray_real / "site-c" / "0002.dcm"))
    assert result.returncode == 0
    assert "DX MONOCHROME2" in result.stdout and "JPEG 2000" in result.stdout


def test_a_bad_flag_is_a_usage_error_with_exit_64() -> None:
    assert run_cli("inspect", "--no-such-flag").returncode == 64
    assert run_cli("no-such-verb").returncode == 64
    assert run_cli("synth").returncode == 64


def test_synth_lists_profiles_and_writes_labelled_files(tmp_path: Path) -> None:
    listed = run_cli("synth", "--list-profiles")
    assert listed.returncode == 0 and "site-a" in listed.stdout
    out = tmp_path / "out"
    result = run_cli("synth", str(out), "--n", "12", "--sites", "2", "--seed", "1", "--long-side", "64")
    assert result.returncode == 0, result.stderr
    header, *rows = (out / "labels.csv").read_text().splitlines()
    assert header == "file,label,site" and len(rows) == 12
    assert all((out / row.split(",")[0]).is_file() for row in rows)
    assert run_cli("synth", str(out), "--site-profile", "nowhere").returncode == 64
    varied = tmp_path / "varied"
    args = ("--n", "12", "--sites", "2", "--seed", "1", "--long-side", "64", "--variety")
    assert run_cli("synth", str(varied), *args).returncode == 0
    assert (varied / "labels.csv").read_text() == (out / "labels.csv").read_text()
    assert any((varied / r.split(",")[0]).read_bytes() != (out / r.split(",")[0]).read_bytes() for r in rows)


@pytest.mark.usefixtures("settings")
def test_ingest_writes_catalog_and_qa_and_exits_2_on_bad_objects(tmp_path: Path) -> None:
    src = tmp_path / "src"
    assert run_cli("synth", str(src), "--n", "10", "--long-side", "64").returncode == 0
    (src / "broken.dcm").write_bytes(b"\x00" * 10)
    dest = tmp_path / "cat.parquet"
    result = run_cli(
        "ingest", str(src), "--catalog", str(dest), "--labels", str(src / "labels.csv"), "--json"
    )
    assert result.returncode == 2
    qa = json.loads(result.stdout)
    assert qa["cataloged"] == 10 and qa["unreadable"][0]["type"] == "NotDicom"
    assert f"{src}/broken.dcm: NotDicom: " in result.stderr
    assert dest.is_file() and Path(f"{dest}.qa.json").is_file()


@pytest.mark.timeout(1800)  # the whole main job, fine-tuning included, on a possibly busy 2-core machine
def test_demo_runs_end_to_end_in_a_deployment_of_its_own_and_prints_the_catalog_summary(
    settings: Settings,
) -> None:
    own = {"DICOM_ROUTER_DATA_DIR": str(settings.data_dir / "demo")}
    try:
        result = run_cli("demo", timeout=1700)
        assert result.returncode == 0, result.stderr
        assert "instances cataloged from s3://dicom-router/demo/raw" in result.stdout
        assert (
            "de-identification audit passed" in result.stdout and "demo/report/report.html" in result.stdout
        )
        assert "adult_chest" in result.stdout
        assert "8/10 review: " in result.stdout and "now in shadow" in result.stdout
        assert "10/10 " in result.stdout  # the gate, and a person's approval when it passed
        # nothing of the user's deployment (registry, bucket, key, servers) was made or touched
        assert sorted(p.name for p in settings.data_dir.iterdir()) == ["demo"]
        assert (settings.data_dir / "demo" / "mlflow").is_dir()
    finally:
        run_cli("stack", "down", env=own)


def test_version_prints_the_release() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"dicom-router {__version__}"


def test_a_decoder_failure_is_one_line_on_stderr_with_no_library_tracebacks(
    dicom_corpus: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(dicom_corpus / "orthanc-tests" / "TransferSyntaxes" / "1.2.840.10008.1.2.4.51.dcm")
    data = bytearray(ds.PixelData)
    middle = len(data) // 2
    data[middle : middle + 200] = b"\xff\x00" * 100  # a broken 12-bit JPEG Extended stream
    ds.PixelData = bytes(data)
    ds.save_as(tmp_path / "broken.dcm")
    result = run_cli("inspect", str(tmp_path / "broken.dcm"))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{tmp_path / 'broken.dcm'}: InvalidPixelData: ")


def test_malformed_values_never_reach_stderr(tmp_path: Path) -> None:
    ds = dicom_dataset(np.zeros((16, 16), np.uint16), PatientBirthDate="1961-03-04", StudyDate="bad")
    ds.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    ingest = ["ingest", str(tmp_path), "--catalog", str(tmp_path / "c.parquet")]
    for args in (["inspect", str(tmp_path / "odd.dcm")], ingest):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert "1961" not in result.stderr and "1961" not in result.stdout
