"""The inference log: one de-identified record per routed instance, batched into Parquet part files.

Layout: ``<prefix>/date=YYYY-MM-DD/part-<UTC time>-<uuid>.parquet`` (local folder or ``s3://``), one fixed
schema for every part, so a day or a window is read by listing one or a few partitions. ``InferenceLog``
hands records to a background thread: ``append`` never waits on storage, so logging cannot slow routing.
"""

from __future__ import annotations

import io
import logging
import math
import queue
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydicom import Dataset

from dicom_router.catalog import CATALOG_SCHEMA
from dicom_router.config import Settings
from dicom_router.dicom.decode import DecodedImage, decode_bytes
from dicom_router.dicom.deid import acquisition_fields, load_key, scanner_id, site_id, uid_hash
from dicom_router.dicom.errors import DicomInputError
from dicom_router.dicom.header import parse
from dicom_router.inference import Bundle, equalize, letterbox, metadata_vector, statistics_of
from dicom_router.monitoring.features import (
    EMBEDDING_COLUMNS,
    STAT_NAMES,
    project_embedding,
)
from dicom_router.storage import open_store, write_uri

log = logging.getLogger(__name__)

_ACQUISITION_FIELDS = (
    "sop_class",
    "modality",
    "manufacturer",
    "model_name",
    "rows",
    "columns",
    "bits_stored",
    "frames",
    "photometric",
    "transfer_syntax",
    "pixel_spacing",
    "kvp",
    "exposure",
    "view_position",
    "body_part_examined",
    "sex",
    "age_years",
)
LOG_SCHEMA = pa.schema(
    [
        ("at", pa.timestamp("us", tz="UTC")),
        ("model_version", pa.string()),
        *(CATALOG_SCHEMA.field(name) for name in ("sop_uid_hash", "site_id", "scanner_id")),
        *(CATALOG_SCHEMA.field(name) for name in _ACQUISITION_FIELDS),
        *((f"img_{name}", pa.float64()) for name in STAT_NAMES),
        ("pred_label", pa.string()),
        ("confidence", pa.float64()),
        ("novelty", pa.float64()),
        *((name, pa.float32()) for name in EMBEDDING_COLUMNS),
        ("shadow_label", pa.string()),
        ("shadow_confidence", pa.float64()),
        ("shadow_version", pa.string()),
    ]
)
"""Every part file has exactly this schema; header columns have the catalog's names and types, so a
catalog, a reference and the log compare column by column. No patient pseudonym, no free text. The
``shadow_*`` columns hold the challenger's answer when a model was in shadow, ``novelty`` how far the
image lies from what the model was trained on (``dicom_router.novelty``; null for a bundle without it,
and in parts written before these columns existed)."""
_PART = re.compile(r"(?:^|/)date=(\d{4}-\d{2}-\d{2})/part-(\d{8}T\d{2})Z-[^/]+\.parquet$")
PART_HOUR = "%Y%m%dT%H"
"""The UTC hour a part was written, in its name (``part_name``); a window's lost records are those of the
parts written in it (``read_window``)."""
LOST_KEY = b"dicom_router.lost"
"""Parquet key-value metadata of a part: how many records were lost (dropped when the queues were full
or storage away, or not built because the instance could not be read) since the previous part was
written. A drift window sums it over its parts, so its report says how much of the traffic it misses."""


def coarse_time(at: datetime) -> datetime:
    """The hour (UTC) an instance was routed: drift windows need no more, and an exact time links a
    record to a patient's visit."""
    return (
        (at if at.tzinfo else at.replace(tzinfo=UTC))
        .astimezone(UTC)
        .replace(minute=0, second=0, microsecond=0)
    )


def log_record(
    ds: Dataset,
    statistics: Mapping[str, float],
    prediction: tuple[str, float],
    embedding: npt.NDArray[np.floating] | None,
    model_version: str,
    at: datetime,
    *,
    key: bytes,
    novelty: float | None = None,
) -> dict[str, Any]:
    """One routed instance → its log record (``LOG_SCHEMA`` keys).

    ``key`` is the deployment's pseudonym key (``deid.load_key``), so ``site_id`` and ``scanner_id`` are
    the catalog's; ``statistics`` are the image's (``inference.statistics_of``). ``embedding`` is the
    bundle's raw ``[D]`` (or ``[1, D]``) output, projected here; None (a server that returns no
    embedding) leaves the projection empty (NaN); ``novelty`` None (a bundle without it) leaves it null.
    """
    fields = acquisition_fields(ds)
    record: dict[str, Any] = {
        "at": coarse_time(at),
        "model_version": model_version,
        "sop_uid_hash": uid_hash(key, ds, "SOPInstanceUID"),
        "site_id": site_id(key, ds),
        "scanner_id": scanner_id(key, ds),
        **{name: fields[name] for name in _ACQUISITION_FIELDS},
    }
    record.update({f"img_{name}": float(value) for name, value in statistics.items()})
    label, confidence = prediction
    record["pred_label"] = label
    record["confidence"] = float(confidence)
    record["novelty"] = None if novelty is None else float(novelty)
    record.update(dict.fromkeys(("shadow_label", "shadow_confidence", "shadow_version")))
    if embedding is None:
        record.update(dict.fromkeys(EMBEDDING_COLUMNS, math.nan))
    else:
        projected = project_embedding(np.asarray(embedding).reshape(1, -1))[0]
        record.update({name: float(v) for name, v in zip(EMBEDDING_COLUMNS, projected, strict=True)})
    return record


def score_items(
    items: Sequence[tuple[str, bytes]],
    bundle: Bundle,
    *,
    key: bytes,
    max_pixels: int,
    at: datetime | None = None,
    batch_size: int = 64,
) -> tuple[list[dict[str, Any]], list[DicomInputError]]:
    """Classify (path, bytes) pairs with the bundle and build their log records (what the worker logs).

    Used to profile training images for the reference and by tests and benchmarks; each image is decoded
    once and prepared as ``inference.prepare`` does. Bad inputs come back as their typed errors.
    """
    when = at or datetime.now(UTC)
    version = f"{bundle.name}/{bundle.version}"
    records: list[dict[str, Any]] = []
    errors: list[DicomInputError] = []
    for offset in range(0, len(items), batch_size):
        decoded: list[DecodedImage] = []
        for path, data in items[offset : offset + batch_size]:
            try:
                decoded.append(decode_bytes(data, path, max_pixels=max_pixels))
            except DicomInputError as exc:
                errors.append(exc)
        if not decoded:
            continue
        config = bundle.preprocess
        images = np.stack(
            [
                letterbox(equalize(d.pixels) if config.equalize else d.pixels, config.image_size)[None]
                for d in decoded
            ]
        )
        meta = np.stack([metadata_vector(acquisition_fields(d.dataset)) for d in decoded])
        scores = bundle.run(images, meta)
        for image, prediction, embedding in zip(
            decoded, bundle.predictions(scores), scores.embedding, strict=True
        ):
            records.append(
                log_record(
                    image.dataset,
                    statistics_of(image),
                    (prediction.label, prediction.confidence),
                    embedding,
                    version,
                    when,
                    key=key,
                    novelty=prediction.novelty,
                )
            )
    return records, errors


def records_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Records → a DataFrame with the log's columns and types (what ``read_inference_log`` returns)."""
    frame: pd.DataFrame = _table(list(records)).to_pandas()
    return frame


def _table(records: list[Mapping[str, Any]], lost: int = 0) -> pa.Table:
    schema = LOG_SCHEMA.with_metadata({LOST_KEY: str(lost).encode()}) if lost else LOG_SCHEMA
    return pa.Table.from_pylist([{k: r.get(k) for k in LOG_SCHEMA.names} for r in records], schema=schema)


def part_name(day: date, now: datetime | None = None) -> str:
    """``date=YYYY-MM-DD/part-<UTC hour>-<uuid>.parquet``: sortable by the hour written (no finer, as
    the records' times), never colliding."""
    stamp = coarse_time(now or datetime.now(UTC)).strftime(f"{PART_HOUR}Z")
    return f"date={day.isoformat()}/part-{stamp}-{uuid.uuid4().hex[:12]}.parquet"


def write_parts(
    records: Sequence[Mapping[str, Any]], uri_prefix: str, settings: Settings, *, lost: int = 0
) -> list[str]:
    """Write records as one Parquet part per UTC day they fall on; returns the parts' URIs. ``lost``
    (``LOST_KEY``) goes with the first part; with no records, with an empty part of today."""
    by_day: defaultdict[date, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_day[_utc(record["at"]).date()].append(record)
    if lost and not by_day:
        by_day[datetime.now(UTC).date()] = []
    written: list[str] = []
    for day, rows in sorted(by_day.items()):
        buffer = io.BytesIO()
        pq.write_table(_table(rows, lost if not written else 0), buffer, compression="zstd")
        uri = f"{uri_prefix.rstrip('/')}/{part_name(day)}"
        write_uri(uri, buffer.getvalue(), settings)
        written.append(uri)
    return written


def _utc(value: Any) -> datetime:
    stamp = pd.Timestamp(value)
    return (stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp.tz_convert(UTC)).to_pydatetime()


@dataclass(frozen=True)
class LogWindow:
    """The records of a time window and how many records of that window were lost (``LOST_KEY``)."""

    frame: pd.DataFrame
    lost: int = 0


def read_inference_log(
    uri_prefix: str, settings: Settings, since: datetime | None = None, until: datetime | None = None
) -> pd.DataFrame:
    """Every record under ``uri_prefix`` with ``since <= at < until`` (``read_window``'s frame)."""
    return read_window(uri_prefix, settings, since, until).frame


def read_window(
    uri_prefix: str, settings: Settings, since: datetime | None = None, until: datetime | None = None
) -> LogWindow:
    """Every record under ``uri_prefix`` with ``since <= at < until``, and the records lost by the parts
    written in that window; only matching day partitions are read. The frame always has the log's
    columns (an empty log gives an empty frame).

    Records carry the hour they were routed in (``coarse_time``), so ``since`` counts from the start of
    its hour: a window that begins mid-hour still holds the instances routed in that hour."""
    if since is not None:
        since = coarse_time(since)
    store = open_store(uri_prefix, settings)
    first = _utc(since).date() if since else None
    last = _utc(until).date() if until else None
    keys, hours = [], []
    for info in sorted(store.list(), key=lambda i: i.key):
        match = _PART.search(info.key)
        if match is None:
            continue
        day = date.fromisoformat(match.group(1))
        if (first is None or day >= first) and (last is None or day <= last):
            keys.append(info.key)
            hours.append(datetime.strptime(match.group(2), PART_HOUR).replace(tzinfo=UTC))
    if not keys:
        return LogWindow(records_frame([]))
    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = list(pool.map(lambda k: pq.read_table(io.BytesIO(store.read(k))), keys))
    lost = sum(
        int((table.schema.metadata or {}).get(LOST_KEY, b"0"))
        for table, hour in zip(tables, hours, strict=True)
        if (since is None or hour >= _utc(since)) and (until is None or hour < _utc(until))
    )
    frame: pd.DataFrame = pa.concat_tables([_conform(t) for t in tables]).to_pandas()
    if since is not None:
        frame = frame[frame["at"] >= pd.Timestamp(_utc(since))]
    if until is not None:
        frame = frame[frame["at"] < pd.Timestamp(_utc(until))]
    return LogWindow(frame.sort_values("at", kind="stable").reset_index(drop=True), lost)


def _conform(table: pa.Table) -> pa.Table:
    """A part in ``LOG_SCHEMA``: columns a later release added are null in older parts."""
    for column in LOG_SCHEMA:
        if column.name not in table.column_names:
            table = table.append_column(column.name, pa.nulls(len(table), column.type))
    return table.select(LOG_SCHEMA.names).cast(LOG_SCHEMA)


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)
    written: bool = False


@dataclass(frozen=True)
class _Lost:
    count: int


_STOP = object()


class InferenceLog:
    """Append records from the hot path; a background thread writes them in batches.

    A batch is written when ``flush_every`` records are waiting or the oldest has waited
    ``flush_after_s``, and on ``flush()`` / ``close()``. A failed write is logged and retried at the next
    deadline; at most ``max_pending`` records wait in memory (beyond that the oldest are dropped and
    counted in ``dropped``), so a storage outage can neither block routing nor exhaust memory. Dropped
    records, and those a caller reports with ``lost``, are written with the next part (``LOST_KEY``).
    """

    def __init__(
        self,
        uri_prefix: str,
        settings: Settings,
        flush_every: int = 256,
        flush_after_s: float = 30,
        *,
        max_pending: int = 100_000,
    ) -> None:
        if flush_every < 1 or flush_after_s <= 0:
            raise ValueError("flush_every must be >= 1 and flush_after_s > 0")
        self.uri_prefix = uri_prefix
        self.settings = settings
        self.flush_every = flush_every
        self.flush_after_s = flush_after_s
        self.max_pending = max_pending
        self.written = 0
        self.dropped = 0
        self._lost = 0
        """Records lost since the last part written (the writer thread's own)."""
        self.parts: list[str] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self._thread.start()

    def append(self, record: Mapping[str, Any]) -> None:
        """Queue one record (a dict copy is taken); never touches storage."""
        if self._closed:
            raise RuntimeError("the inference log is closed")
        self._queue.put(dict(record))

    def lost(self, count: int = 1) -> None:
        """Count records that will never be appended (the drift report of their window says so)."""
        self._queue.put(_Lost(count))

    def flush(self, timeout: float | None = None) -> bool:
        """Write everything appended so far; True when it was written (False: timed out or failed)."""
        request = _Flush()
        self._queue.put(request)
        return request.done.wait(timeout) and request.written

    def close(self, timeout: float | None = None) -> None:
        """Flush and stop the writer thread; later ``append`` calls raise."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def __enter__(self) -> InferenceLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _run(self) -> None:
        pending: list[dict[str, Any]] = []
        deadline = math.inf
        while True:
            wait = None if not (pending or self._lost) else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if isinstance(item, dict | _Lost):
                if not (pending or self._lost):
                    deadline = time.monotonic() + self.flush_after_s
                if isinstance(item, _Lost):
                    self._lost += item.count
                    continue
                pending.append(item)
                if len(pending) > self.max_pending:
                    drop = len(pending) - self.max_pending
                    del pending[:drop]
                    self.dropped += drop
                    self._lost += drop
                    log.warning("inference log: %d records dropped (storage unavailable?)", drop)
                if len(pending) < self.flush_every:
                    continue
            pending = self._write(pending)
            deadline = time.monotonic() + self.flush_after_s
            if isinstance(item, _Flush):
                item.written = not pending
                item.done.set()
            elif item is _STOP:
                if pending:
                    log.error("inference log closed with %d records unwritten", len(pending))
                return

    def _write(self, pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write ``pending`` (and the lost count); what could not be written comes back to wait for the
        next attempt."""
        if not (pending or self._lost):
            return pending
        try:
            self.parts.extend(write_parts(pending, self.uri_prefix, self.settings, lost=self._lost))
        except Exception:
            log.exception("inference log: writing %d records to %s failed", len(pending), self.uri_prefix)
            return pending
        self.written += len(pending)
        self._lost = 0
        return []


class Answer(Protocol):
    """What the routing worker knows after the model answered (``serving.client.Classification``)."""

    @property
    def label(self) -> str: ...

    @property
    def confidence(self) -> float: ...

    @property
    def model_version(self) -> str: ...

    @property
    def statistics(self) -> Mapping[str, float] | None: ...

    @property
    def embedding(self) -> npt.NDArray[np.float32] | None: ...

    @property
    def novelty(self) -> float | None: ...

    @property
    def shadow_label(self) -> str | None: ...

    @property
    def shadow_confidence(self) -> float | None: ...

    @property
    def shadow_version(self) -> str | None: ...


class InstanceLogger:
    """The routing worker's ``on_classified`` hook: ``(instance_id, dicom_bytes, answer)`` → log record.

    The call only queues the bytes; a background thread decodes them (image statistics need pixels),
    builds the record and appends it to ``log``. At most ``max_queued`` instances wait: beyond that
    new ones are dropped and counted (``dropped``), so a slow disk never holds up routing or memory.
    """

    def __init__(self, log: InferenceLog, settings: Settings, *, max_queued: int = 64) -> None:
        self.log = log
        self.key = load_key(settings)
        self.max_pixels = settings.max_image_pixels
        self.model_name = settings.registered_model
        self.dropped = 0
        self.failed = 0
        self._queue: queue.Queue[tuple[str, bytes, Answer, datetime] | None] = queue.Queue(max_queued)
        self._thread = threading.Thread(target=self._run, name="inference-log-records", daemon=True)
        self._thread.start()

    def __call__(self, instance_id: str, data: bytes, answer: Answer) -> None:
        try:
            self._queue.put_nowait((instance_id, data, answer, datetime.now(UTC)))
        except queue.Full:
            self.dropped += 1
            self.log.lost()

    def close(self, timeout: float | None = None) -> None:
        """Log what is queued, then flush and close the inference log."""
        self._queue.put(None)
        self._thread.join(timeout)
        self.log.close(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            instance_id, data, answer, at = item
            version = (
                answer.model_version
                if "/" in answer.model_version
                else f"{self.model_name}/{answer.model_version}"
            )
            try:
                if answer.statistics is not None:  # from the model server's decode: no second one here
                    ds, statistics = parse(data, instance_id), answer.statistics
                else:
                    decoded = decode_bytes(data, instance_id, max_pixels=self.max_pixels)
                    ds, statistics = decoded.dataset, statistics_of(decoded)
                prediction = (answer.label, answer.confidence)
                record = log_record(
                    ds,
                    statistics,
                    prediction,
                    answer.embedding,
                    version,
                    at,
                    key=self.key,
                    novelty=answer.novelty,
                )
                if answer.shadow_label is not None:
                    record["shadow_label"] = answer.shadow_label
                    record["shadow_confidence"] = answer.shadow_confidence
                    record["shadow_version"] = f"{self.model_name}/{answer.shadow_version}"
                self.log.append(record)
            except Exception:  # one odd instance must not stop logging the others
                self.failed += 1
                self.log.lost()
                log.exception("inference log: no record for %s", instance_id)
