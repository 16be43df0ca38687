"""Ingest as a fan-out: plan the shards, ingest one shard, merge the parts into one catalog and QA."""

from __future__ import annotations

import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dicom_router.catalog import (
    SOURCE_METADATA,
    IngestResult,
    ingest,
    pixel_duplicates,
    qa_summary,
    read_catalog,
)
from dicom_router.config import Settings
from dicom_router.dicom.errors import ERROR_TYPES, DicomInputError
from dicom_router.dicom.header import read_header
from dicom_router.steps import CATALOG_FILE
from dicom_router.storage import Store, open_store, read_uri, write_uri

log = logging.getLogger(__name__)


def plan_shards(
    source: str, settings: Settings, *, objects_per_shard: int, max_shards: int
) -> list[dict[str, int]]:
    """The ingest fan-out: one shard per ``objects_per_shard`` objects under ``source``, at most
    ``max_shards``, as ``{"index", "count"}`` items (listing is cheap next to reading headers, so each
    shard lists again and keeps its own keys)."""
    n = sum(1 for _ in open_store(source, settings).list())
    count = max(1, min(max_shards, math.ceil(n / max(1, objects_per_shard))))
    log.info("%d objects under %s → %d ingest shard(s)", n, source, count)
    return [{"index": i, "count": count} for i in range(count)]


def ingest_shard(
    source: str,
    out_dir: str,
    settings: Settings,
    *,
    shard: int,
    count: int,
    labels_uri: str = "",
    reviewed_uri: str = "",
) -> IngestResult:
    """One shard's part catalog (and its QA) in ``out_dir``; labels default to ``<source>/labels.csv``;
    ``reviewed_uri``: reviewers' labels (a ``review export`` under ``source``), ``label_source=review``."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return ingest(
        source,
        f"{out_dir}/{CATALOG_FILE}",
        settings,
        labels_uri=labels_uri or f"{source.rstrip('/')}/labels.csv",
        reviewed_uri=reviewed_uri or None,
        progress=False,
        shard=(shard, count),
    )


def merge_catalogs(
    part_dirs: Sequence[str], out_dir: str, settings: Settings, *, catalog_uri: str = ""
) -> IngestResult:
    """One catalog and one QA summary from the shards' parts, as if one ingest had read everything.

    Rows are concatenated; duplicates by SOP UID and content are recomputed over all rows; pixel
    duplicates found inside a shard are kept, and fingerprint matches that span shards are confirmed by
    hashing their pixel data. Written to ``out_dir`` and, when given, also to ``catalog_uri``.
    """
    if not part_dirs:
        raise ValueError("no part catalogs to merge")
    tables = [pq.read_table(io.BytesIO(read_uri(f"{d}/{CATALOG_FILE}", settings))) for d in part_dirs]
    qas = [json.loads(read_uri(f"{d}/{CATALOG_FILE}.qa.json", settings)) for d in part_dirs]
    sources = {(t.schema.metadata or {}).get(SOURCE_METADATA.encode(), b"").decode() for t in tables}
    if len(sources) != 1:
        raise ValueError(f"parts come from different sources: {sorted(sources)}")
    source = sources.pop()
    table = pa.concat_tables(tables).sort_by("key")
    frame = table.to_pandas()
    errors = sorted((_input_error(e) for qa in qas for e in qa["unreadable"]), key=lambda e: e.path)
    missing = {k: v for qa in qas for k, v in qa["missing_required"].items()}
    skipped = sorted({k for qa in qas for k in qa["skipped_sidecars"]})
    same_pixels = _merged_pixel_duplicates(
        open_store(source, settings),
        [
            (dict(zip(t["key"].to_pylist(), t["pixel_fingerprint"].to_pylist(), strict=True)), qa)
            for t, qa in zip(tables, qas, strict=True)
        ],
        {str(k): int(v) for k, v in zip(frame["key"], frame["size"], strict=True)},
        settings,
    )
    labels = _merged_labels([qa["labels"] for qa in qas])
    qa = qa_summary(frame, errors, missing, skipped, same_pixels, source=source, labels=labels)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    qa_text = json.dumps(qa, indent=2).encode()
    targets = [f"{out_dir}/{CATALOG_FILE}", *([catalog_uri] if catalog_uri else [])]
    for target in targets:
        write_uri(target, buf.getvalue(), settings)
        write_uri(target + ".qa.json", qa_text, settings)
    return IngestResult(targets[-1], targets[-1] + ".qa.json", frame, qa, errors)


def read_ingest_result(catalog_uri: str, settings: Settings) -> IngestResult:
    """A written catalog and its QA summary back as an ingest result (for tables and exit codes after a
    pipeline run)."""
    frame, _ = read_catalog(catalog_uri, settings)
    qa = json.loads(read_uri(catalog_uri + ".qa.json", settings))
    errors = [_input_error(e) for e in qa["unreadable"]]
    return IngestResult(catalog_uri, catalog_uri + ".qa.json", frame, qa, errors)


def _input_error(entry: Mapping[str, str]) -> DicomInputError:
    """A QA summary's unreadable entry back into the contract's typed error."""
    kind = next((t for t in ERROR_TYPES if t.type == entry["type"]), DicomInputError)
    return kind(entry["key"], entry["reason"])


def _merged_pixel_duplicates(
    store: Store,
    parts: Sequence[tuple[dict[str, str | None], Mapping[str, Any]]],
    sizes: Mapping[str, int],
    settings: Settings,
) -> list[list[str]]:
    """Each part's own pixel-duplicate groups, plus those whose fingerprint matches span parts."""
    by_fingerprint: defaultdict[str, set[int]] = defaultdict(set)
    for index, (fingerprints, _) in enumerate(parts):
        for fingerprint in fingerprints.values():
            if fingerprint:
                by_fingerprint[fingerprint].add(index)
    spanning = {f for f, shards in by_fingerprint.items() if len(shards) > 1}
    rows = [
        {"key": key, "pixel_fingerprint": fingerprint}
        for fingerprints, _ in parts
        for key, fingerprint in fingerprints.items()
        if fingerprint in spanning
    ]
    cross = {str(r["key"]) for r in rows}
    kept = [g for _, qa in parts for g in qa["duplicates"]["pixels"] if not set(g) & cross]
    locations: dict[str, tuple[int | None, int | None]] = {}
    for key in sorted(cross):
        header = read_header(
            _prefix_reader(store, key, sizes[key]), sizes[key], key, settings.header_range_bytes
        )
        locations[key] = (header.pixel_start, header.pixel_length)
    return sorted(kept + pixel_duplicates(store, rows, locations))


def _prefix_reader(store: Store, key: str, size: int) -> Callable[[int], bytes]:
    """``read_header``'s fetch: the object's first ``n`` bytes (all of it once ``n`` reaches its size)."""

    def fetch(n: int) -> bytes:
        return store.read(key, n if n < size else None)

    return fetch


def _merged_labels(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Labels QA over all parts (every shard matched labels against the whole listing)."""
    if not any(parts):
        return {}
    return {
        "labelled": sum(int(p["labelled"]) for p in parts),
        "unlabelled": sorted(k for p in parts for k in p["unlabelled"]),
        "invalid_labels": sorted((e for p in parts for e in p["invalid_labels"]), key=lambda e: e["key"]),
        "labels_without_object": parts[0]["labels_without_object"],
    }
