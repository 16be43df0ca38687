"""Ingest: object storage (or a folder) → de-identified Parquet catalog + QA summary.

Only headers are read (a ranged read of each object's first bytes, grown when a header is longer), in a
process pool sized to the cores. Every object ends up somewhere a person can see: a catalog row, or the
QA summary's unreadable list with its typed error; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dicom_router import LABELS
from dicom_router.config import Settings
from dicom_router.dicom.deid import deidentified_fields, load_key, phi_tags
from dicom_router.dicom.errors import DicomInputError
from dicom_router.dicom.header import parse, read_header
from dicom_router.errors import ObjectMissing, StorageError
from dicom_router.storage import LocalStore, ObjectInfo, Store, md5_hex, open_store, read_uri, write_uri

CATALOG_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("size", pa.int64()),
        ("sop_uid_hash", pa.string()),
        ("study_uid_hash", pa.string()),
        ("series_uid_hash", pa.string()),
        ("patient_hash", pa.string()),
        ("site_id", pa.string()),
        ("scanner_id", pa.string()),
        ("sop_class", pa.string()),
        ("modality", pa.string()),
        ("manufacturer", pa.string()),
        ("model_name", pa.string()),
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("bits_stored", pa.int16()),
        ("frames", pa.int32()),
        ("photometric", pa.string()),
        ("transfer_syntax", pa.string()),
        ("pixel_spacing", pa.float64()),
        ("kvp", pa.float64()),
        ("exposure", pa.float64()),
        ("view_position", pa.string()),
        ("body_part_examined", pa.string()),
        ("sex", pa.string()),
        ("age_years", pa.float64()),
        ("has_pixels", pa.bool_()),
        ("label", pa.string()),
        ("label_source", pa.string()),
        ("content_hash", pa.string()),
        ("pixel_fingerprint", pa.string()),
        ("missing_tags", pa.list_(pa.string())),
        ("phi_tags", pa.list_(pa.string())),
    ]
)
"""The contract's columns plus a few more; ``label`` is null without ``--labels``; ``label_source`` says
who gave the label: ``labels.csv`` (the folder's labels), or ``review`` (a reviewer's correction, from
``review export``). ``missing_tags``: required tags the object lacks; ``phi_tags``: which PHI-bearing
elements the source object carried (names, never values: the de-identification audit's input);
``body_part_examined``: the header's code string, which ``report`` holds against the model's answer."""

LABEL_SOURCES = ("labels.csv", "review")

REQUIRED_TAGS = (
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "Modality",
    "Rows",
    "Columns",
)
SIDECAR_SUFFIXES = (".csv", ".md", ".txt", ".json", ".parquet", ".yaml", ".yml")
"""Files that live beside DICOM in labelled folders; listed in the QA summary as skipped."""
SOURCE_METADATA = "dicom_router.source"
"""Parquet metadata key holding where the cataloged objects live (keys are relative to it)."""
FINGERPRINT_BYTES = 8 * 1024
"""The pixel fingerprint hashes the pixel data's length and first bytes: equal fingerprints are only
candidates, confirmed by hashing the whole pixel data, so duplicates are exact without reading every
object's pixels."""
_CHUNK = 32


@dataclass
class IngestResult:
    catalog_uri: str
    qa_uri: str
    catalog: pd.DataFrame
    qa: dict[str, Any]
    errors: list[DicomInputError] = field(default_factory=list)


def ingest(
    source: str,
    catalog_uri: str,
    settings: Settings,
    *,
    labels_uri: str | None = None,
    reviewed_uri: str | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> IngestResult:
    """Catalog every object under ``source`` into ``catalog_uri`` (local path or ``s3://``).

    ``shard=(index, count)`` catalogs only the objects ``shard_of`` puts in that shard (one task of a
    fanned-out ingest); labels are still matched against every listed object. ``reviewed_uri``: the
    ``labels.csv`` of a ``review export`` placed under ``source``; its labels (``label_source=review``)
    apply to the objects beside it and take precedence.
    """
    store = open_store(source, settings)
    key = load_key(settings)
    labels_name = labels_uri.rstrip("/").rpartition("/")[2] if labels_uri else "labels.csv"
    objects, skipped = [], []
    for info in store.list():
        name = info.key.rpartition("/")[2]
        if name.startswith(".") or info.key == labels_name or name.lower().endswith(SIDECAR_SUFFIXES):
            skipped.append(info.key)
        else:
            objects.append(info)
    listed = {o.key for o in objects}
    if shard is not None:
        objects = [o for o in objects if shard_of(o.key, shard[1]) == shard[0]]
    rows: list[dict[str, Any]] = []
    errors: list[DicomInputError] = []
    vanished: list[str] = []
    for batch_rows, batch_errors, batch_vanished in _map_chunks(store, key, objects, settings, progress):
        rows.extend(batch_rows)
        errors.extend(batch_errors)
        vanished.extend(batch_vanished)
    rows.sort(key=lambda r: str(r["key"]))
    errors.sort(key=lambda e: e.path)
    missing: dict[str, list[str]] = {r["key"]: r["missing_tags"] for r in rows}
    same_pixels = pixel_duplicates(store, rows, {r["key"]: r.pop("_pixels") for r in rows})
    schema, labels_qa = CATALOG_SCHEMA, {}
    if labels_uri or reviewed_uri:
        labels = read_labels(labels_uri, settings) if labels_uri else {}
        if reviewed_uri:
            labels |= read_reviewed_labels(store.uri, reviewed_uri, settings)
        extras = _carried_columns(labels)
        labels_qa = _apply_labels(rows, labels, listed, extras)
        for column in extras.values():
            schema = schema.append(pa.field(column, pa.string()))
    table = pa.Table.from_pylist(rows, schema=schema.with_metadata({SOURCE_METADATA: store.uri}))
    frame = table.to_pandas()
    qa = qa_summary(
        frame, errors, missing, skipped, same_pixels, source=store.uri, labels=labels_qa, vanished=vanished
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_uri(catalog_uri, buf.getvalue(), settings)
    qa_uri = catalog_uri + ".qa.json"
    write_uri(qa_uri, json.dumps(qa, indent=2).encode(), settings)
    return IngestResult(catalog_uri, qa_uri, frame, qa, errors)


def shard_of(key: str, count: int) -> int:
    """The shard (0..count-1) an object key belongs to: a stable hash, so every task of a fanned-out
    ingest agrees without being sent the key list."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % count


def _chunks(items: Sequence[ObjectInfo], size: int) -> Iterator[list[ObjectInfo]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _map_chunks(
    store: Store, key: bytes, objects: Sequence[ObjectInfo], settings: Settings, progress: bool
) -> Iterator[tuple[list[dict[str, Any]], list[DicomInputError], list[str]]]:
    range_bytes = settings.header_range_bytes
    chunks = list(_chunks(objects, _CHUNK))
    with (
        Progress(disable=not progress, transient=True, console=Console(stderr=True)) as bar,
        ProcessPoolExecutor(max_workers=max(1, settings.workers)) as pool,
    ):
        task = bar.add_task(f"ingest {store.uri}", total=len(objects))
        futures = [pool.submit(_ingest_chunk, store, key, chunk, range_bytes) for chunk in chunks]
        for future, chunk in zip(futures, chunks, strict=True):
            yield future.result()
            bar.advance(task, len(chunk))


def _ingest_chunk(
    store: Store, key: bytes, chunk: list[ObjectInfo], range_bytes: int
) -> tuple[list[dict[str, Any]], list[DicomInputError], list[str]]:
    """Rows, bad inputs, and objects deleted since the listing ("could not read", never "bad DICOM").
    Any other storage failure (after the store's retries) raises ``StorageError`` and fails the run:
    training on what happened to be readable during an outage would quietly shrink the data."""
    rows, errors, vanished = [], [], []
    for info in chunk:
        try:
            rows.append(catalog_row(store, key, info, range_bytes))
        except DicomInputError as exc:
            errors.append(exc)
        except (ObjectMissing, FileNotFoundError):
            vanished.append(info.key)
        except StorageError:
            raise
        except OSError as exc:
            path = f"{store.uri.rstrip('/')}/{info.key}"
            raise StorageError(f"{path}: {exc.__class__.__name__}: {exc}") from exc
    return rows, errors, vanished


def catalog_row(store: Store, key: bytes, info: ObjectInfo, range_bytes: int) -> dict[str, Any]:
    """One object → one de-identified row (plus ``_pixels``: where its pixel data lies, for confirming
    duplicates)."""
    path = f"{store.uri.rstrip('/')}/{info.key}"
    header = read_header(
        lambda n: store.read(info.key, n if n < info.size else None), info.size, path, first=range_bytes
    )
    ds = header.dataset
    if info.md5:
        content_md5: str | None = info.md5
    elif len(header.head) >= info.size:
        content_md5 = md5_hex(header.head)
    else:  # local files have no ETag; reading a local file is cheap
        content_md5 = md5_hex(store.read(info.key)) if isinstance(store, LocalStore) else None
    fingerprint = None
    if header.pixel_start is not None and header.pixel_length is not None:
        end = header.pixel_start + min(FINGERPRINT_BYTES, header.pixel_length)
        head = header.head if len(header.head) >= end else store.read(info.key, end)
        fingerprint = _fingerprint(header.pixel_length, head[header.pixel_start : end])
    elif header.has_pixels:  # a deflated data set, parsed whole
        value = ds.PixelData
        fingerprint = _fingerprint(len(value), value[:FINGERPRINT_BYTES])
    row = {"key": info.key, "size": info.size, **deidentified_fields(key, ds)}
    row["has_pixels"] = header.has_pixels
    row["label"] = None
    row["label_source"] = None
    row["content_hash"] = f"md5:{content_md5}" if content_md5 else None
    row["pixel_fingerprint"] = fingerprint
    row["phi_tags"] = phi_tags(ds)
    row["missing_tags"] = [t for t in REQUIRED_TAGS if not str(ds.get(t, "")).strip()] + (
        [] if header.has_pixels else ["PixelData"]
    )
    row["_pixels"] = (header.pixel_start, header.pixel_length)
    return row


def _fingerprint(length: int, first_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(b"%d:" % length + first_bytes).hexdigest()


def _pixel_hash(store: Store, key: str, start: int | None, length: int | None) -> str:
    """SHA-256 of the whole Pixel Data value (a ranged read of just the pixels)."""
    if start is None or length is None:  # deflated: the pixels exist only after inflating
        return hashlib.sha256(parse(store.read(key), key).PixelData).hexdigest()
    return hashlib.sha256(store.read(key, length, offset=start)).hexdigest()


def pixel_duplicates(
    store: Store, rows: Sequence[dict[str, Any]], pixels: dict[str, tuple[int | None, int | None]]
) -> list[list[str]]:
    """Groups of objects whose pixel data is byte-identical; only equal fingerprints are read whole."""
    by_fingerprint: defaultdict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row["pixel_fingerprint"]:
            by_fingerprint[row["pixel_fingerprint"]].append(row["key"])
    by_hash: defaultdict[str, list[str]] = defaultdict(list)
    for keys in by_fingerprint.values():
        if len(keys) > 1:
            for key in keys:
                by_hash[_pixel_hash(store, key, *pixels[key])].append(key)
    return sorted(sorted(keys) for keys in by_hash.values() if len(keys) > 1)


def read_labels(uri: str, settings: Settings) -> dict[str, dict[str, str]]:
    """``labels.csv`` (``file,label`` and any extra columns) → {file: row}."""
    text = read_uri(uri, settings).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
        raise ValueError(f"{uri}: labels need the columns file,label (found {reader.fieldnames})")
    return {row["file"].strip().lstrip("./"): row for row in reader}


def read_reviewed_labels(source: str, uri: str, settings: Settings) -> dict[str, dict[str, str]]:
    """A reviewed folder's labels, keyed relative to ``source`` (the folder must be under it) and
    marked ``label_source=review``."""
    folder = uri.rstrip("/").rpartition("/")[0]
    root = source.rstrip("/")
    if "://" not in uri and "://" not in source:  # local folders: compare resolved paths
        folder, root = str(Path(folder).resolve()), str(Path(root).resolve())
    if not (folder == root or folder.startswith(root + "/")):
        raise ValueError(f"{uri}: reviewed labels must lie under the ingested source {source}")
    prefix = folder[len(root) :].strip("/")
    return {
        f"{prefix}/{file}" if prefix else file: {**row, "label_source": LABEL_SOURCES[1]}
        for file, row in read_labels(uri, settings).items()
    }


CARRIED_COLUMNS = ("site", "source", "collection", "license", "view")
"""labels.csv columns the catalog carries: an allow-list, since free text (notes, names, record numbers
a hospital export adds) must not leave ingest."""


def _carried_columns(labels: dict[str, dict[str, str]]) -> dict[str, str]:
    """labels.csv's allowed optional columns → catalog column names (prefixed on a clash)."""
    first = next(iter(labels.values()), {})
    return {c: (f"labels_{c}" if c in CATALOG_SCHEMA.names else c) for c in first if c in CARRIED_COLUMNS}


def _apply_labels(
    rows: list[dict[str, Any]], labels: dict[str, dict[str, str]], listed: set[str], extras: dict[str, str]
) -> dict[str, Any]:
    """Set each row's label and carried columns; report what doesn't match (unknown or missing label,
    label for no object)."""
    invalid, unlabelled = [], []
    for row in rows:
        entry = labels.get(row["key"])
        for source, column in extras.items():
            row[column] = (entry.get(source) or None) if entry else None
        if entry is None:
            unlabelled.append(row["key"])
        elif (label := entry["label"].strip()) in LABELS:
            row["label"] = label
            given = (entry.get("label_source") or "").strip()
            row["label_source"] = given if given in LABEL_SOURCES else LABEL_SOURCES[0]
        else:
            invalid.append({"key": row["key"], "label": label})
    return {
        "labelled": sum(r["label"] is not None for r in rows),
        "unlabelled": unlabelled,
        "invalid_labels": invalid,
        "labels_without_object": sorted(set(labels) - listed),
    }


def _duplicates(frame: pd.DataFrame, column: str) -> list[list[str]]:
    groups: defaultdict[str, list[str]] = defaultdict(list)
    for value, key in zip(frame[column], frame["key"], strict=True):
        if isinstance(value, str):
            groups[value].append(key)
    return sorted(sorted(keys) for keys in groups.values() if len(keys) > 1)


def qa_summary(
    frame: pd.DataFrame,
    errors: Iterable[DicomInputError],
    missing: dict[str, list[str]],
    skipped: list[str],
    same_pixels: list[list[str]],
    *,
    source: str,
    labels: dict[str, Any],
    vanished: Sequence[str] = (),
) -> dict[str, Any]:
    """What a data manager checks before training: bad inputs (``unreadable``: not DICOM, or DICOM we
    cannot use), objects that could not be read (deleted since the listing), duplicate and incomplete
    instances."""
    errors = list(errors)
    return {
        "source": source,
        "objects": len(frame) + len(errors) + len(vanished),
        "cataloged": len(frame),
        "unreadable": [{"key": e.path, "type": e.type, "reason": e.reason} for e in errors],
        "could_not_read": sorted(vanished),
        "duplicates": {
            "sop_uid": _duplicates(frame, "sop_uid_hash"),
            "content": _duplicates(frame, "content_hash"),
            "pixels": same_pixels,
        },
        "missing_required": {k: v for k, v in sorted(missing.items()) if v},
        "skipped_sidecars": sorted(skipped),
        "labels": labels,
        "counts": {
            column: {str(k): int(v) for k, v in Counter(frame[column].fillna("(none)")).most_common()}
            for column in ("modality", "site_id", "scanner_id", "label")
        },
    }


def read_catalog(uri: str, settings: Settings) -> tuple[pd.DataFrame, str]:
    """A catalog and the source its keys are relative to."""
    table = pq.read_table(io.BytesIO(read_uri(uri, settings)))
    source = (table.schema.metadata or {}).get(SOURCE_METADATA.encode(), b"").decode()
    if not source:
        raise ValueError(f"{uri} has no {SOURCE_METADATA} metadata: re-run `dicom-router ingest`")
    return table.to_pandas(), source


def summary_table(result: IngestResult) -> Table:
    """The catalog at a glance: instances per site and scanner, with modality and label mix."""
    frame, qa = result.catalog, result.qa
    table = Table(
        title=f"{len(frame)} instances cataloged from {qa['source']} → {result.catalog_uri}",
        caption=(
            f"unreadable {len(qa['unreadable'])} · duplicate SOP {len(qa['duplicates']['sop_uid'])} · "
            f"duplicate content {len(qa['duplicates']['content'])} · "
            f"duplicate pixels {len(qa['duplicates']['pixels'])} · "
            f"missing tags {len(qa['missing_required'])} · QA: {result.qa_uri}"
        ),
    )
    for column in ("site_id", "scanner_id", "manufacturer", "modality", "instances", *LABELS, "unlabelled"):
        table.add_column(column, justify="right" if column not in ("site_id", "scanner_id") else "left")
    groups = frame.fillna({"site_id": "(none)", "scanner_id": "(none)"}).groupby(
        ["site_id", "scanner_id"], sort=True
    )
    for (site, scanner), group in groups:
        counts = group["label"].value_counts()
        table.add_row(
            str(site),
            str(scanner),
            ", ".join(sorted(set(group["manufacturer"].fillna("")))),
            ", ".join(sorted(set(group["modality"].fillna("")))),
            str(len(group)),
            *(str(int(counts.get(label, 0))) for label in LABELS),
            str(int(group["label"].isna().sum())),
        )
    return table
