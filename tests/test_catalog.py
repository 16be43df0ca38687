"""Ingest: de-identified catalog rows, QA that loses nothing, the same result from S3 and from a folder."""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_router import stack
from dicom_router.catalog import CATALOG_SCHEMA, ingest
from dicom_router.config import Settings
from dicom_router.storage import S3Store, open_store, upload_folder
from dicom_router.synth import synthesize
from tests.conftest import phi_values, run_cli

CONTRACT_COLUMNS = [
    *("key", "size", "sop_uid_hash", "study_uid_hash", "series_uid_hash", "patient_hash", "site_id"),
    *("scanner_id", "modality", "manufacturer", "model_name", "rows", "columns", "bits_stored"),
    *("photometric", "transfer_syntax", "pixel_spacing", "kvp", "exposure", "age_years", "label"),
    "content_hash",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    synthesize(folder, 40, sites=3, seed=11, long_side_px=64)
    return folder


def test_catalog_has_the_contract_columns_and_no_identifiers(synthetic: Path, settings: Settings) -> None:
    dest = settings.data_dir / "catalog.parquet"
    result = ingest(
        str(synthetic), str(dest), settings, labels_uri=str(synthetic / "labels.csv"), progress=False
    )
    frame = pd.read_parquet(dest)
    assert set(CONTRACT_COLUMNS) <= set(frame.columns)
    assert len(frame) == 40 and not result.errors
    assert set(frame["label"]) <= {"abdominal", "adult_chest", "pediatric_chest", "spine", "others"}
    assert frame["label"].notna().all() and frame["site"].notna().all()  # labels.csv's extra column carried
    assert set(frame["label_source"]) == {"labels.csv"}  # no label_source column: the folder's labels
    assert frame["sop_uid_hash"].is_unique and frame["site_id"].nunique() == 3
    raw = dest.read_bytes() + (settings.data_dir / "catalog.parquet.qa.json").read_bytes()
    text = frame.astype(str).to_csv()
    phi = phi_values(synthetic)
    assert phi
    for value in phi:
        assert value not in text and value.encode() not in raw


def test_pseudonyms_are_stable_across_runs_with_the_kept_key(synthetic: Path, settings: Settings) -> None:
    first = ingest(str(synthetic), str(settings.data_dir / "a.parquet"), settings, progress=False).catalog
    second = ingest(str(synthetic), str(settings.data_dir / "b.parquet"), settings, progress=False).catalog
    pd.testing.assert_frame_equal(first, second)
    other = settings.model_copy(update={"data_dir": settings.data_dir / "other-deployment"})
    third = ingest(str(synthetic), str(settings.data_dir / "c.parquet"), other, progress=False).catalog
    assert not set(first["patient_hash"]) & set(third["patient_hash"])


def test_qa_lists_unreadable_duplicate_and_incomplete_objects(synthetic: Path, settings: Settings) -> None:
    folder = settings.data_dir / "messy"
    shutil.copytree(synthetic, folder)
    files = sorted(folder.rglob("*.dcm"))
    shutil.copy(files[0], folder / "copy-of-first.dcm")  # same bytes, same SOP UID
    ds = pydicom.dcmread(files[1])
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "RESENT^AGAIN"
    ds.save_as(folder / "resent.dcm", enforce_file_format=True)  # new header, same pixel bytes
    ds = pydicom.dcmread(files[2])
    del ds.PatientID
    ds.save_as(folder / "no-patient.dcm", enforce_file_format=True)
    (folder / "notes.dcm").write_text("not an image")
    data = files[3].read_bytes()
    (folder / "cut.dcm").write_bytes(data[: len(data) // 2])

    result = ingest(str(folder), str(settings.data_dir / "messy.parquet"), settings, progress=False)
    qa = result.qa
    assert qa["objects"] == 45 and qa["cataloged"] == 43
    assert {(u["key"].rpartition("/")[2], u["type"]) for u in qa["unreadable"]} == {
        ("notes.dcm", "NotDicom"),
        ("cut.dcm", "Truncated"),
    }
    first = files[0].relative_to(folder).as_posix()
    assert sorted([first, "copy-of-first.dcm"]) in qa["duplicates"]["sop_uid"]
    assert sorted([first, "copy-of-first.dcm"]) in qa["duplicates"]["content"]
    second = files[1].relative_to(folder).as_posix()
    assert sorted([second, "resent.dcm"]) in qa["duplicates"]["pixels"]
    assert qa["missing_required"] == {"no-patient.dcm": ["PatientID"]}
    assert qa["skipped_sidecars"] == ["labels.csv"]


def test_labels_that_do_not_match_are_reported(synthetic: Path, settings: Settings) -> None:
    labels = settings.data_dir / "labels.csv"
    lines = (synthetic / "labels.csv").read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 2)[0] + ",knee,site-x"
    del lines[2]
    lines.append("missing/file.dcm,spine,site-a")
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_text("\n".join(lines) + "\n")
    result = ingest(
        str(synthetic), str(settings.data_dir / "l.parquet"), settings, labels_uri=str(labels), progress=False
    )
    assert result.qa["labels"]["invalid_labels"] == [{"key": lines[1].split(",")[0], "label": "knee"}]
    assert len(result.qa["labels"]["unlabelled"]) == 1
    assert result.qa["labels"]["labels_without_object"] == ["missing/file.dcm"]
    assert result.qa["labels"]["labelled"] == 38
    unlabelled = result.catalog[result.catalog["label"].isna()]
    assert len(unlabelled) == 2 and unlabelled["label_source"].isna().all()


def test_ingest_from_s3_matches_ingest_from_the_folder(synthetic: Path, s3_settings: Settings) -> None:
    store = open_store(f"s3://{s3_settings.s3_bucket}/same", s3_settings)
    assert isinstance(store, S3Store)
    store.ensure_bucket()
    upload_folder(synthetic, store)
    dest = f"s3://{s3_settings.s3_bucket}/catalogs/same.parquet"
    from_s3 = ingest(store.uri, dest, s3_settings, labels_uri=f"{store.uri}/labels.csv", progress=False)
    local = str(s3_settings.data_dir / "same.parquet")
    from_folder = ingest(
        str(synthetic), local, s3_settings, labels_uri=str(synthetic / "labels.csv"), progress=False
    )
    pd.testing.assert_frame_equal(from_s3.catalog, from_folder.catalog)
    written = pd.read_parquet(
        io.BytesIO(open_store(f"s3://{s3_settings.s3_bucket}/catalogs", s3_settings).read("same.parquet"))
    )
    pd.testing.assert_frame_equal(written, from_s3.catalog)


def test_objects_are_read_by_range_with_md5_from_the_etag(s3_settings: Settings) -> None:
    folder = s3_settings.data_dir / "large-src"
    synthesize(folder, 2, site_profile="site-a", long_side_px=1024, seed=5)
    store = open_store(f"s3://{s3_settings.s3_bucket}/large", s3_settings)
    assert isinstance(store, S3Store)
    upload_folder(folder, store)
    sizes = {o.key: o.size for o in store.list() if o.key.endswith(".dcm")}
    assert all(size > 16 * s3_settings.header_range_bytes for size in sizes.values())
    result = ingest(store.uri, str(s3_settings.data_dir / "large.parquet"), s3_settings, progress=False)
    frame = result.catalog.set_index("key")
    for key in sizes:
        assert str(frame.loc[key, "pixel_fingerprint"]).startswith("sha256:")
        expected = hashlib.md5((folder / key).read_bytes(), usedforsecurity=False).hexdigest()
        assert frame.loc[key, "content_hash"] == f"md5:{expected}"
    assert list(result.catalog.columns)[: len(CATALOG_SCHEMA)] == CATALOG_SCHEMA.names


def test_only_allowed_labels_columns_reach_the_catalog(synthetic: Path, settings: Settings) -> None:
    rows = list(csv.DictReader((synthetic / "labels.csv").open()))
    labels = settings.data_dir / "phi-labels.csv"
    labels.parent.mkdir(parents=True, exist_ok=True)
    with labels.open("w", newline="") as out:
        writer = csv.DictWriter(out, [*rows[0], "note", "mrn"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "note": "Jane Roe, 12 Elm St, called 555-0199", "mrn": "MRN-884211"})
    result = ingest(
        str(synthetic), str(settings.data_dir / "p.parquet"), settings, labels_uri=str(labels), progress=False
    )
    assert "site" in result.catalog.columns
    assert not {"note", "mrn", "labels_note", "labels_mrn"} & set(result.catalog.columns)
    table = pq.read_table(settings.data_dir / "p.parquet").to_pandas()
    text = table.astype(str).to_csv()
    assert "Jane Roe" not in text and "MRN-884211" not in text


def test_an_s3_outage_fails_the_ingest_as_a_storage_error_never_as_bad_dicom(
    synthetic: Path, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "outage")
    stack.s3_up(settings)
    try:
        store = open_store(f"s3://{settings.s3_bucket}/in", settings)
        for path in sorted(synthetic.rglob("*.dcm"))[:3]:
            store.write(path.name, path.read_bytes())
    finally:
        stack.down(settings)  # the object store goes away before the ingest
    result = run_cli("ingest", store.uri, "--catalog", str(tmp_path / "c.parquet"), env=settings.as_env())
    assert result.returncode == 1
    assert result.stderr.startswith("error: storage: ") and "NotDicom" not in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "c.parquet").exists()


def test_reviewed_labels_under_the_source_are_cataloged_as_reviews(
    tmp_path: Path, settings: Settings
) -> None:
    source = tmp_path / "raw"
    synthesize(source, 6, sites=2, seed=41, long_side_px=32)
    synthesize(source / "reviewed", 2, sites=1, seed=42, long_side_px=32)
    rows = list(csv.DictReader((source / "reviewed" / "labels.csv").open()))
    with (source / "reviewed" / "labels.csv").open("w", newline="") as out:  # what `review export` writes
        writer = csv.DictWriter(out, fieldnames=["file", "label", "label_source"])
        writer.writeheader()
        writer.writerows({"file": r["file"], "label": "others", "label_source": "review"} for r in rows)
    result = ingest(
        str(source),
        str(tmp_path / "c.parquet"),
        settings,
        labels_uri=str(source / "labels.csv"),
        reviewed_uri=str(source / "reviewed" / "labels.csv"),
        progress=False,
    )
    frame = result.catalog.set_index("key")
    reviewed = frame[frame.index.str.startswith("reviewed/")]
    assert len(reviewed) == 2 and set(reviewed["label"]) == {"others"}
    assert set(reviewed["label_source"]) == {"review"}
    assert set(frame.drop(reviewed.index)["label_source"]) == {"labels.csv"} and len(frame) == 8
    with pytest.raises(ValueError, match="must lie under the ingested source"):
        ingest(
            str(source / "reviewed"),
            str(tmp_path / "d.parquet"),
            settings,
            reviewed_uri=str(tmp_path / "elsewhere" / "labels.csv"),
            progress=False,
        )
