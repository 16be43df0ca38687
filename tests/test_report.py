"""`dicom-router report`: archive analytics whose figures match counts made by hand from the DICOM files,
that show no PHI value anywhere, and read the same from a partitioned catalog on S3 as from a file."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_router.catalog import ingest
from dicom_router.config import Settings
from dicom_router.dicom.deid import (
    BURNED_IN,
    PHI_TAGS,
    PRIVATE_ELEMENTS,
    load_key,
    patient_hash,
    site_id,
    uid_hash,
)
from dicom_router.monitoring.inference_log import LOG_SCHEMA, write_parts
from dicom_router.report.figures import (
    archive_report,
    fleet_flags,
    histogram_quantiles,
    open_archive,
)
from dicom_router.report.render import write_frame_report
from dicom_router.storage import S3Store, open_store
from dicom_router.synth import synthesize
from tests.conftest import phi_values, run_cli

ADDED_PHI = ("DR^WHO^REFERRER", "OPERATOR^JANE", "Chest pain since Tuesday, call 555-0199")
BODY_PARTS = {"adult_chest": "CHEST", "pediatric_chest": "CHEST", "abdominal": "ABDOMEN", "spine": "LSPINE"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A messy archive: synthetic radiographs plus a resent copy, a re-sent pixel duplicate, a study
    with a second patient, a missing PatientID, a non-DICOM file, headers with BodyPartExamined (one in
    three wrong), extra PHI elements, a private element and a burned-in annotation flag."""
    folder = tmp_path_factory.mktemp("archive")
    synthesize(folder, 30, sites=3, seed=5, long_side_px=48)
    files = sorted(folder.rglob("*.dcm"))
    labels = {row["file"]: row["label"] for row in csv.DictReader((folder / "labels.csv").open())}
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        label = labels[path.relative_to(folder).as_posix()]
        if index % 2 == 0:  # every other file has a header; every third of those says CHEST whatever it is
            ds.BodyPartExamined = "CHEST" if index % 3 == 0 else BODY_PARTS.get(label, "HAND")
        if index % 4 == 0:
            ds.ReferringPhysicianName = ADDED_PHI[0]
            ds.OperatorsName = ADDED_PHI[1]
            ds.AdditionalPatientHistory = ADDED_PHI[2]
        if index == 5:
            ds.add_new(0x00110010, "LO", "ACME PRIVATE")
            ds.add_new(0x00111001, "LO", "secret vendor note")
            ds.BurnedInAnnotation = "YES"
        ds.save_as(path, enforce_file_format=True)
    shutil.copy(files[0], folder / "copy-of-first.dcm")
    ds = pydicom.dcmread(files[1])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "resent.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = pydicom.dcmread(files[3]).StudyInstanceUID
    ds.PatientID = "SOMEONE-ELSE-7"
    ds.save_as(folder / "wrong-patient.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(files[4])
    ds.SOPInstanceUID = generate_uid()
    del ds.PatientID
    ds.save_as(folder / "no-patient.dcm", enforce_file_format=True)
    (folder / "notes").write_text("not an image")  # no .dcm: what phi_values reads must be DICOM
    with (folder / "labels.csv").open("a") as f:
        for name, source in (("copy-of-first.dcm", 0), ("resent.dcm", 1), ("wrong-patient.dcm", 2)):
            f.write(f"{name},{labels[files[source].relative_to(folder).as_posix()]}\n")
    return folder


def readable(folder: Path) -> list[pydicom.Dataset]:
    out: list[pydicom.Dataset] = []
    for path in sorted(folder.rglob("*.dcm")):
        try:
            out.append(pydicom.dcmread(path, stop_before_pixels=True))
        except pydicom.errors.InvalidDicomError:
            continue
    return out


def catalog_of(archive: Path, settings: Settings) -> Path:
    dest = settings.data_dir / "catalog.parquet"
    ingest(str(archive), str(dest), settings, labels_uri=str(archive / "labels.csv"), progress=False)
    return dest


def test_report_figures_equal_counts_made_by_hand_and_show_no_phi(archive: Path, settings: Settings) -> None:
    catalog = catalog_of(archive, settings)
    out = settings.data_dir / "report"
    done = run_cli("report", str(catalog), "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)

    datasets = readable(archive)
    key = load_key(settings)
    assert document["instances"] == len(datasets) == 34
    assert document["studies"] == len({str(ds.StudyInstanceUID) for ds in datasets})
    assert document["series"] == len({str(ds.SeriesInstanceUID) for ds in datasets})
    assert document["patients"] == len({str(ds.PatientID) for ds in datasets if ds.get("PatientID")})
    per_site = Counter(site_id(key, ds) for ds in datasets)
    groups: Counter[str] = Counter()
    for group in document["hierarchy"]["groups"]:
        groups[group["site_id"]] += group["instances"]
    assert groups == per_site
    sizes = Counter(Counter(str(ds.StudyInstanceUID) for ds in datasets).values())
    assert {h["size"]: h["n"] for h in document["hierarchy"]["instances_per_study"]["histogram"]} == sizes

    patients_by_sex: defaultdict[tuple[str | None, str], set[str]] = defaultdict(set)
    for ds in datasets:
        if ds.get("PatientID"):
            sex = str(ds.get("PatientSex", "")).upper()[:1] or "unknown"
            patients_by_sex[(site_id(key, ds), sex)].add(patient_hash(key, ds) or "")
    assert {(r["site_id"], r["sex"]): r["n"] for r in document["population"]["sex"] if r["n"]} == {
        k: len(v) for k, v in patients_by_sex.items()
    }

    quality = document["quality"]
    assert quality["missing_required"] == {"PatientID": 1}
    assert quality["unreadable"] == {"NotDicom": 1}
    assert quality["inconsistent_studies"]["patients"] == 1
    assert quality["duplicates"]["sop_uid"] == {"groups": 1, "instances": 2}
    assert quality["duplicates"]["content"] == {"groups": 1, "instances": 2}
    # first + its copy, and second + the resent one; no-patient and wrong-patient share pixels with others too
    assert quality["duplicates"]["pixels"]["confirmed"] is True
    assert quality["duplicates"]["pixels"]["groups"] == 4

    labels = {row["file"]: row["label"] for row in csv.DictReader((archive / "labels.csv").open())}
    compared = disagree = 0
    for path in sorted(archive.rglob("*.dcm")):
        name = path.relative_to(archive).as_posix()
        if name not in labels:  # unlabelled: not compared
            continue
        header = str(pydicom.dcmread(path, stop_before_pixels=True).get("BodyPartExamined", ""))
        if header:
            compared += 1
            group = {"CHEST": "chest", "ABDOMEN": "abdominal", "LSPINE": "spine"}.get(header, "others")
            truth = "chest" if labels[name].endswith("_chest") else labels[name]
            disagree += group != truth
    rows = quality["body_part"]["vs_label"]
    assert [sum(r["compared"] for r in rows), sum(r["disagree"] for r in rows)] == [compared, disagree]
    assert disagree > 0

    audit = document["deidentification"]
    by_hand: Counter[str] = Counter()
    for ds in datasets:
        by_hand.update(k for k in PHI_TAGS if ds.get(k) not in (None, "") and str(ds.get(k)).strip())
        by_hand.update([PRIVATE_ELEMENTS] if any(e.tag.is_private for e in ds) else [])
        by_hand.update([BURNED_IN] if ds.get("BurnedInAnnotation") == "YES" else [])
    assert {t["tag"]: t["objects"] for t in audit["tags"]} == dict(by_hand)
    assert audit["passed"] and audit["objects_audited"] == 34

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4
    for name in ("hierarchy", "population", "labels", "acquisition", "deidentification"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = page + (out / "report.json").read_text() + done.stdout + done.stderr
    secrets = phi_values(archive) | set(ADDED_PHI) | {"SOMEONE-ELSE-7", "secret vendor note"}
    assert secrets
    for value in secrets:
        assert value not in written


def test_the_model_s_answers_from_the_inference_log_sit_beside_labels_and_headers(
    archive: Path, settings: Settings
) -> None:
    catalog = catalog_of(archive, settings)
    key = load_key(settings)
    answers: dict[str | None, str] = {}
    datasets = readable(archive)
    for index, ds in enumerate(datasets):
        if index % 2 == 0:
            answers[uid_hash(key, ds, "SOPInstanceUID")] = ("spine", "adult_chest", "others")[index % 3]
    records = [
        dict.fromkeys(LOG_SCHEMA.names)
        | {"at": datetime(2026, 11, 1, 10, tzinfo=UTC), "sop_uid_hash": sop, "pred_label": answer}
        for sop, answer in answers.items()
    ]
    expected: Counter[tuple[str | None, str]] = Counter()
    headers_vs_model = [0, 0]
    for ds in datasets:  # every catalog row with an answer (a re-sent copy shares its SOP's answer)
        answer = answers.get(uid_hash(key, ds, "SOPInstanceUID"))
        if answer is None:
            continue
        expected[(site_id(key, ds), answer)] += 1
        if header := str(ds.get("BodyPartExamined", "")):
            group = {"CHEST": "chest", "ABDOMEN": "abdominal", "LSPINE": "spine"}.get(header, "others")
            headers_vs_model[0] += 1
            headers_vs_model[1] += group != ("chest" if answer == "adult_chest" else answer)
    log = settings.data_dir / "inference-log"
    write_parts(records, str(log), settings)

    document = archive_report(
        open_archive(str(catalog), settings),
        settings,
        predictions=pq.read_table(next(log.rglob("*.parquet"))).to_pandas(),
    )
    predicted = Counter({(r["site_id"], r["label"]): r["n"] for r in document["labels"]["predicted"]})
    assert predicted == expected and document["labels"]["labelled"]
    rows = document["quality"]["body_part"]["vs_predicted"]
    assert [sum(r["compared"] for r in rows), sum(r["disagree"] for r in rows)] == headers_vs_model

    done = run_cli("report", str(catalog), "--inference-log", str(log), "--out", str(settings.data_dir / "r"))
    assert done.returncode == 0, done.stderr
    assert "de-identification audit passed" in done.stdout


def test_a_partitioned_catalog_on_s3_reads_like_the_local_file(archive: Path, s3_settings: Settings) -> None:
    catalog = s3_settings.data_dir / "s3-catalog.parquet"
    ingest(str(archive), str(catalog), s3_settings, labels_uri=str(archive / "labels.csv"), progress=False)
    table = pq.read_table(catalog)
    store = open_store(f"s3://{s3_settings.s3_bucket}/report-catalog", s3_settings)
    assert isinstance(store, S3Store)
    store.ensure_bucket()
    for index, site in enumerate(sorted(set(table["site_id"].to_pylist()))):
        part = table.filter(pa.compute.equal(table["site_id"], site)).drop_columns(["site_id"])
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink)
        store.write(f"site_id={site}/part-{index}.parquet", sink.getvalue().to_pybytes())
    local = archive_report(open_archive(str(catalog), s3_settings), s3_settings)
    remote = archive_report(open_archive(store.uri, s3_settings), s3_settings)
    for document in (local, remote):
        for name in ("catalog", "generated_at", "quality"):
            document.pop(name)
        document["hierarchy"]["groups"].sort(key=lambda g: (g["site_id"], g["scanner_id"]))
    assert remote == local


def test_a_catalog_column_outside_the_de_identified_schema_fails_the_audit(
    archive: Path, settings: Settings
) -> None:
    table = pq.read_table(catalog_of(archive, settings))
    leaked = table.append_column("patient_name", pa.array(["X"] * len(table)))
    leaked = leaked.set_column(
        leaked.schema.get_field_index("site_id"), "site_id", pa.array(["St Elsewhere"] * len(table))
    )
    pq.write_table(leaked, settings.data_dir / "leaked.parquet")
    audit = archive_report(open_archive(str(settings.data_dir / "leaked.parquet"), settings), settings)[
        "deidentification"
    ]
    failed = {c["check"]: c["violations"] for c in audit["checks"] if not c["passed"]}
    assert failed == {
        "columns are the de-identified schema": 1,
        "identifiers are keyed pseudonyms": len(table),
    }
    assert not audit["passed"]


def test_an_unknown_group_column_or_a_missing_catalog_is_a_usage_error(
    settings: Settings, archive: Path
) -> None:
    catalog = catalog_of(archive, settings)
    assert run_cli("report", str(catalog), "--by", "no_such_column").returncode == 64
    missing = run_cli("report", str(settings.data_dir / "nowhere.parquet"))
    assert missing.returncode == 64 and "no catalog there" in missing.stderr


def test_histogram_quantiles_are_sizes_that_occur() -> None:
    histogram = [{"size": 1, "n": 80}, {"size": 2, "n": 15}, {"size": 7, "n": 5}]
    assert histogram_quantiles(histogram) == {"min": 1, "p50": 1, "p90": 2, "p99": 7, "max": 7}
    assert histogram_quantiles([])["p50"] is None


def test_a_scanner_whose_median_exposure_stands_apart_is_flagged() -> None:
    def row(scanner: str, median: float, outliers: int = 0) -> dict[str, Any]:
        return {"scanner_id": scanner, "column": "exposure", "n": 100, "p50": median, "outliers": outliers}

    numeric = [row(f"s{i}", 5.0 + 0.1 * i) for i in range(6)] + [row("moved", 25.0, outliers=3)]
    flags = fleet_flags(numeric)
    assert {(f["scanner_id"], f["reason"].split(" ")[0]) for f in flags} == {
        ("moved", "median"),
        ("moved", "instances"),
    }


def test_report_on_the_shared_real_radiographs(xray_real: Path, settings: Settings) -> None:
    catalog = catalog_of(xray_real, settings)
    document = archive_report(open_archive(str(catalog), settings), settings)
    labels = Counter(row["label"] for row in csv.DictReader((xray_real / "labels.csv").open()))
    assert document["instances"] == sum(labels.values())
    labelled: Counter[str] = Counter()
    for row in document["labels"]["labelled"]:
        labelled[row["label"]] += row["n"]
    assert labelled == labels
    assert document["deidentification"]["passed"]
    assert {t["tag"] for t in document["deidentification"]["tags"]} >= {"PatientName", "PatientID"}


def test_a_window_without_traffic_still_gets_a_report_without_warnings(
    settings: Settings, recwarn: pytest.WarningsRecorder
) -> None:
    out = settings.data_dir / "empty"
    document = write_frame_report(LOG_SCHEMA.empty_table().to_pandas(), settings, out, name="a quiet night")
    assert document["instances"] == 0 and document["studies"] is None
    assert (out / "report.html").read_text().count("a quiet night") == 2  # title and heading
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
