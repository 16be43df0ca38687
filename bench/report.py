"""``dicom-router report`` at archive scale: time and peak memory on synthetic catalogs.

Catalogs of 0.1 M, 1 M and 10 M instances are generated (rows with realistic distributions, not DICOM:
Zipf-sized sites with 2–8 scanners each, patients with several studies, studies with several series,
per-scanner acquisition settings, 12% of BodyPartExamined headers wrong or empty, duplicates, missing
tags, PHI-tag lists as ingest writes them), written as Parquet partitioned by site (``site_id=…/``,
one file per site per million rows). Each report runs in a fresh process, the way the CLI runs it, and
reports its wall time and peak RSS; the ratios to the smallest catalog, measured in the same run, show
how both grow with the row count. Targets: 10 M instances in ≤ 60 s and ≤ 4 GB peak RSS on 2 cores.

    .venv/bin/python bench/report.py [--sizes 100000,1000000,10000000] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.dataset as pads

from dicom_router import LABELS
from dicom_router.catalog import CATALOG_SCHEMA, SOURCE_METADATA

CHUNK = 1_000_000
SITES = 20
LABEL_SHARE = (0.15, 0.45, 0.08, 0.12, 0.20)
"""abdominal, adult chest, pediatric chest, spine, others: an archive's mix, roughly."""
BODY_PARTS = {"abdominal": "ABDOMEN", "adult_chest": "CHEST", "pediatric_chest": "CHEST", "spine": "LSPINE"}
PHI_TEMPLATES = (
    [
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "StudyDate",
        "StudyTime",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "InstitutionName",
        "StationName",
        "ReferringPhysicianName",
        "StudyDescription",
    ],
    [
        "PatientName",
        "PatientID",
        "PatientAge",
        "AccessionNumber",
        "StudyDate",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "InstitutionName",
        "DeviceSerialNumber",
        "OperatorsName",
        "(private elements)",
    ],
    ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
    [
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "InstitutionName",
        "ImageComments",
        "BurnedInAnnotation",
    ],
)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hex_ids(values: npt.NDArray[np.uint64], width: int = 16) -> pa.Array:
    """Integers → fixed-width lowercase hex strings, vectorised and scrambled (as keyed pseudonyms look)."""
    mixed = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps: a bijection on 64 bits
    as_bytes = mixed.astype(">u8").view(np.uint8).reshape(-1, 8)
    digits = np.empty((len(values), 16), dtype=np.uint8)
    digits[:, 0::2] = _HEX[as_bytes >> 4]
    digits[:, 1::2] = _HEX[as_bytes & 0x0F]
    flat = np.ascontiguousarray(digits[:, 16 - width :]).reshape(-1)
    offsets = np.arange(0, len(values) * width + 1, width, dtype=np.int32)
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(flat))


def _lists(choice: npt.NDArray[np.int64], templates: list[list[str]]) -> pa.Array:
    """One list per row, row i being ``templates[choice[i]]``, built from offsets (no Python loop)."""
    lengths = np.array([len(t) for t in templates], dtype=np.int32)[choice]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]).astype(np.int32)
    vocabulary = sorted({tag for t in templates for tag in t})
    codes = [np.array([vocabulary.index(tag) for tag in t], dtype=np.int32) for t in templates]
    starts = np.concatenate([[0], np.cumsum([len(c) for c in codes])])
    flat_codes = np.concatenate(codes)
    index = np.repeat(starts[choice], lengths) + (np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths))
    values = pa.DictionaryArray.from_arrays(pa.array(flat_codes[index]), pa.array(vocabulary)).cast(
        pa.string()
    )
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def chunk_table(n: int, start: int, rng: np.random.Generator) -> pa.Table:
    """``n`` catalog rows (ids from ``start`` on, so chunks never collide)."""
    sizes = 1.0 / np.arange(1, SITES + 1)
    site_p = sizes / sizes.sum()
    scanners_per_site = rng.integers(2, 9, SITES)
    n_series, n_studies = int(n / 1.6), int(n / 2.4)
    n_patients = int(n_studies / 1.8)
    series = rng.integers(0, n_series, n)
    study_of_series = rng.integers(0, n_studies, n_series)
    patient_of_study = rng.integers(0, n_patients, n_studies)
    site_of_patient = rng.choice(SITES, n_patients, p=site_p)
    study = study_of_series[series]
    patient = patient_of_study[study]
    site = site_of_patient[patient]
    scanner = site * 10 + study % scanners_per_site[site]  # a study is made on one device
    label_index = rng.choice(len(LABELS), n, p=LABEL_SHARE)
    labels = np.array(LABELS, dtype=object)[label_index]
    labelled = rng.random(n) < 0.1  # a tenth of the archive labelled, as for a first model
    body = np.array([BODY_PARTS.get(label, "EXTREMITY") for label in LABELS], dtype=object)[label_index]
    wrong = rng.random(n)
    body[wrong < 0.06] = ""
    body[(wrong >= 0.06) & (wrong < 0.12)] = "CHEST"
    body[body == ""] = None
    spacing_of_scanner = rng.uniform(0.1, 0.2, SITES * 10)
    kvp_of_label = np.array([80.0, 120.0, 70.0, 90.0, 60.0])
    exposure = rng.lognormal(np.log(5.0), 0.5, n) * (1 + (scanner == 13) * 4)  # one scanner moved
    duplicated = rng.random(n) < 0.002
    ids = np.arange(start, start + n, dtype=np.uint64)
    sop = ids.copy()
    sop[duplicated] = np.maximum(ids[duplicated], 1) - 1
    age = np.minimum(np.floor(rng.gamma(4.0, 13.0, n)), 90.0)
    age[rng.random(n) < 0.05] = np.nan
    missing = rng.random(n) < 0.003
    columns = {
        "key": pa.array(np.char.add("obj/", np.arange(start, start + n).astype(str)).astype(object)),
        "size": pa.array(rng.integers(2_000_000, 20_000_000, n)),
        "sop_uid_hash": hex_ids(sop * np.uint64(2654435761) + np.uint64(7)),
        "study_uid_hash": hex_ids((study + start).astype(np.uint64) * np.uint64(40503) + np.uint64(11)),
        "series_uid_hash": hex_ids((series + start).astype(np.uint64) * np.uint64(69069) + np.uint64(13)),
        "patient_hash": hex_ids((patient + start).astype(np.uint64) * np.uint64(1103515245) + np.uint64(17)),
        "site_id": hex_ids(site.astype(np.uint64) * np.uint64(2246822519) + np.uint64(1)),
        "scanner_id": hex_ids(scanner.astype(np.uint64) * np.uint64(3266489917) + np.uint64(3)),
        "sop_class": pa.array(
            np.where(scanner % 3 == 0, "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1")
        ),
        "modality": pa.array(np.where(scanner % 3 == 0, "CR", "DX")),
        "manufacturer": pa.array(np.array(["Acme", "Orbis", "Kodak-like", "Fuji-like"])[scanner % 4]),
        "model_name": pa.array(np.char.add("Model-", (scanner % 7).astype(str))),
        "rows": pa.array((2000 + (scanner % 5) * 200 + rng.integers(-50, 50, n)).astype(np.int32)),
        "columns": pa.array((2400 + (scanner % 4) * 200 + rng.integers(-50, 50, n)).astype(np.int32)),
        "bits_stored": pa.array(np.array([10, 12, 14, 16], dtype=np.int16)[scanner % 4]),
        "frames": pa.array(np.ones(n, dtype=np.int32)),
        "photometric": pa.array(np.where(scanner % 3 == 0, "MONOCHROME1", "MONOCHROME2")),
        "transfer_syntax": pa.array(
            np.where(scanner % 2 == 0, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90")
        ),
        "pixel_spacing": pa.array(spacing_of_scanner[scanner]),
        "kvp": pa.array(np.round(kvp_of_label[label_index] + rng.normal(0, 5, n))),
        "exposure": pa.array(exposure),
        "view_position": pa.array(np.array(["PA", "AP", "LAT", ""])[rng.integers(0, 4, n)]),
        "body_part_examined": pa.array(body, type=pa.string()),
        "sex": pa.array(np.array(["F", "M"])[patient % 2]),
        "age_years": pa.array(age, mask=np.isnan(age)),
        "has_pixels": pa.array(np.ones(n, dtype=bool)),
        "label": pa.array(labels, type=pa.string(), mask=~labelled),
        "label_source": pa.array(np.full(n, "labels.csv", dtype=object), type=pa.string(), mask=~labelled),
        "content_hash": hex_ids(sop * np.uint64(97) + np.uint64(5)),
        "pixel_fingerprint": hex_ids(sop * np.uint64(89) + np.uint64(3)),
        "missing_tags": _lists(missing.astype(np.int64), [[], ["PatientID"]]),
        "phi_tags": _lists(rng.choice(len(PHI_TEMPLATES), n, p=(0.5, 0.3, 0.15, 0.05)), list(PHI_TEMPLATES)),
    }
    table = pa.table(columns)
    return table.cast(CATALOG_SCHEMA).replace_schema_metadata({SOURCE_METADATA: "s3://bench/archive"})


def write_catalog(n: int, out: Path, seed: int = 0) -> Path:
    """A synthetic catalog of ``n`` rows under ``out``, partitioned by site (hive folders)."""
    rng = np.random.default_rng(seed)
    for index, start in enumerate(range(0, n, CHUNK)):
        table = chunk_table(min(CHUNK, n - start), start, rng)
        pads.write_dataset(
            table,
            out,
            format="parquet",
            partitioning=["site_id"],
            partitioning_flavor="hive",
            basename_template=f"part-{index:04d}-{{i}}.parquet",
            existing_data_behavior="overwrite_or_ignore",
            file_options=pads.ParquetFileFormat().make_write_options(compression="zstd"),
        )
    return out


_CHILD = """
import json, resource, sys, time
from pathlib import Path
from dicom_router.config import Settings
from dicom_router.report.figures import archive_report, open_archive
from dicom_router.report.render import write_report
t = time.perf_counter()
settings = Settings()
document = archive_report(open_archive(sys.argv[1], settings), settings)
write_report(document, Path(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "instances": document["instances"],
    "studies": document["studies"], "patients": document["patients"],
    "audit_passed": document["deidentification"]["passed"]}))
"""


def measure(catalog: Path, out: Path) -> dict[str, float]:
    """One report in a fresh process (as the CLI runs): wall time and peak RSS of that process."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(catalog), str(out)], check=True, capture_output=True, text=True
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--work", type=Path, help="Where the catalogs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="Keep the generated catalogs")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-report-"))
    rows = []
    try:
        for n in sizes:
            started = time.perf_counter()
            catalog = write_catalog(n, work / f"catalog-{n}")
            generated = time.perf_counter() - started
            disk = sum(p.stat().st_size for p in catalog.rglob("*.parquet")) / 2**20
            result = measure(catalog, work / f"report-{n}")
            rows.append({"n": n, "generate_s": generated, "parquet_mb": disk, **result})
            print(
                f"{n:>11,} instances: generated in {generated:6.1f} s ({disk:7.1f} MB Parquet); report "
                f"{result['seconds']:6.1f} s, peak RSS {result['peak_rss_mb']:7.0f} MB",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(catalog)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    base = rows[0]
    print(f"\n{'instances':>12} {'report s':>9} {'× time':>7} {'peak MB':>8} {'× RSS':>6} {'µs/row':>7}")
    for r in rows:
        print(
            f"{r['n']:>12,} {r['seconds']:9.1f} {r['seconds'] / base['seconds']:7.2f} "
            f"{r['peak_rss_mb']:8.0f} {r['peak_rss_mb'] / base['peak_rss_mb']:6.2f} "
            f"{1e6 * r['seconds'] / r['n']:7.2f}"
        )
    largest = rows[-1]
    rows_x, time_x = largest["n"] / base["n"], largest["seconds"] / base["seconds"]
    print(
        f"\nlargest: {largest['n']:,} instances in {largest['seconds']:.1f} s (target ≤ 60 s), peak RSS "
        f"{largest['peak_rss_mb'] / 1024:.2f} GB (target ≤ 4 GB); rows ×{rows_x:.0f} → time ×{time_x:.1f}, "
        f"memory ×{largest['peak_rss_mb'] / base['peak_rss_mb']:.1f}"
    )


if __name__ == "__main__":
    main()
