"""The durable routing queue and audit: one SQLite file (WAL) shared by Orthanc's hook and the worker.

Standard library only: Orthanc's embedded Python imports this module inside the stored-instance
callback, where the only allowed work is one cheap insert. The worker claims due rows, records the
classification on the row (so a retried forward never reclassifies), the forward job, and finally the
outcome; every decision is also appended to ``audit``, never updated.

Row states: ``pending`` (to classify) → ``forwarding`` (decided, to be sent) → ``done``.
A row whose attempt failed goes back to ``pending``/``forwarding`` with ``next_attempt_at`` in the
future (exponential backoff); after ``max_attempts`` failures it becomes ``dead`` (a dead letter, listed
by ``route --dead-letter`` and sent through routing again by ``route --replay``).

Reviewers' corrections (``routing.review``) are appended to ``corrections`` (triggers refuse updates
and deletes) in the same transaction that sends the instance back to ``pending`` with its
``reviewed_label``.

Several workers may share one queue (``route --once`` beside the router, replicas): a worker only
handles rows it has *claimed* under ``BEGIN IMMEDIATE`` with a lease (owner, expiry), so no two
workers classify or forward one instance at once; a killed worker's rows come back when its lease
expires.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    instance_id TEXT PRIMARY KEY,
    enqueued_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    study_id TEXT,
    body_part TEXT,
    confidence REAL,
    model_version TEXT,
    routing_error TEXT,
    rule TEXT,
    routed_to TEXT,
    destination TEXT,
    done_at REAL,
    sop_hash TEXT,
    lease_owner TEXT,
    lease_until REAL,
    forward_started REAL,
    site_id TEXT,
    scanner_id TEXT,
    margin REAL,
    reviewed_label TEXT,
    novelty REAL,
    review_threshold REAL
);
CREATE INDEX IF NOT EXISTS queue_due ON queue (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS queue_study ON queue (study_id);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    instance_id TEXT NOT NULL,
    study_id TEXT,
    body_part TEXT,
    confidence REAL,
    model_version TEXT,
    rule TEXT,
    routed_to TEXT,
    destination TEXT,
    outcome TEXT NOT NULL,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS corrections (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    sop_hash TEXT,
    site_id TEXT,
    scanner_id TEXT,
    kind TEXT NOT NULL,
    label TEXT NOT NULL,
    previous TEXT,
    previous_confidence REAL,
    previous_route TEXT,
    model_version TEXT,
    reviewer TEXT NOT NULL,
    via TEXT NOT NULL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS corrections_instance ON corrections (instance_id);
CREATE TRIGGER IF NOT EXISTS corrections_append_only_update BEFORE UPDATE ON corrections
BEGIN SELECT RAISE(ABORT, 'corrections are append-only'); END;
CREATE TRIGGER IF NOT EXISTS corrections_append_only_delete BEFORE DELETE ON corrections
BEGIN SELECT RAISE(ABORT, 'corrections are append-only'); END;
"""

CORRECTION_COLUMNS = (
    "at",
    "instance_id",
    "sop_hash",
    "site_id",
    "scanner_id",
    "kind",
    "label",
    "previous",
    "previous_confidence",
    "previous_route",
    "model_version",
    "reviewer",
    "via",
    "note",
)
"""A reviewer's correction, as stored (``seq`` aside): append-only, the table refuses updates and deletes."""

ADDED_COLUMNS = {
    "sop_hash": "TEXT",
    "lease_owner": "TEXT",
    "lease_until": "REAL",
    "forward_started": "REAL",
    "site_id": "TEXT",
    "scanner_id": "TEXT",
    "margin": "REAL",
    "reviewed_label": "TEXT",
    "novelty": "REAL",
    "review_threshold": "REAL",
}
"""Columns later releases added: a queue file written by an older router gains them on open."""

COLUMNS = (
    "instance_id",
    "enqueued_at",
    "state",
    "attempts",
    "next_attempt_at",
    "last_error",
    "study_id",
    "body_part",
    "confidence",
    "model_version",
    "routing_error",
    "rule",
    "routed_to",
    "destination",
    "done_at",
    "sop_hash",
    "forward_started",
    "site_id",
    "scanner_id",
    "margin",
    "reviewed_label",
    "novelty",
    "review_threshold",
)


@dataclass(frozen=True)
class Item:
    """One queued instance as the worker sees it."""

    instance_id: str
    enqueued_at: float
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    study_id: str | None
    body_part: str | None
    confidence: float | None
    model_version: str | None
    routing_error: str | None
    rule: str | None
    routed_to: str | None
    destination: str | None
    done_at: float | None
    sop_hash: str | None
    forward_started: float | None
    """Set while a store is in flight: still set on a claimed row, the last store's outcome is unknown."""
    site_id: str | None = None
    scanner_id: str | None = None
    margin: float | None = None
    """The model's top probability minus the runner-up's: how unsure it was (review suggestions)."""
    reviewed_label: str | None = None
    """A reviewer's label: once set, the instance is routed by it (and no longer by the model)."""
    novelty: float | None = None
    """How unlike the model's training images it is (above the rules' threshold: review)."""
    review_threshold: float | None = None
    """The model's own review threshold (the rules' ``below_confidence: model``); None: it has none."""

    @property
    def classified(self) -> bool:
        return self.body_part is not None or self.routing_error is not None


@dataclass(frozen=True)
class QueueStats:
    """What the router's ``/health`` and ``/metrics`` report."""

    by_state: dict[str, int]
    oldest_due_age_s: float
    attempts: int
    dead: int
    delivered: dict[str, int]


class RoutingQueue:
    """Thread-safe access to the queue file; each process opens its own."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes, cheap commits
        self._db.executescript(SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(queue)")}
        for name, kind in ADDED_COLUMNS.items():
            if name not in present:
                try:
                    self._db.execute(f"ALTER TABLE queue ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as exc:  # the hook and the router opened it at once
                    if "duplicate column" not in str(exc):
                        raise

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- the hook's only call ------------------------------------------------------------------
    def enqueue(self, instance_id: str) -> bool:
        """Record a stored instance once; True if it was new. Re-stores of a known instance are no-ops."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO queue (instance_id, enqueued_at) VALUES (?, ?)",
                (instance_id, time.time()),
            )
            return cursor.rowcount == 1

    # --- the worker ----------------------------------------------------------------------------
    def claim(self, owner: str, limit: int, lease_s: float, now: float | None = None) -> list[Item]:
        """Lease up to ``limit`` due rows, oldest first, that no other worker holds: one transaction, so
        two workers never get the same row."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM queue WHERE state IN ('pending', 'forwarding') "
                "AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until <= ?) "
                "ORDER BY enqueued_at LIMIT ?",
                (now, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE queue SET lease_owner = ?, lease_until = ? WHERE instance_id = ?",
                [(owner, now + lease_s, row[0]) for row in rows],
            )
        return [Item(*row) for row in rows]

    def hold(self, owner: str, instance_ids: list[str], lease_s: float) -> list[str]:
        """Renew ``owner``'s lease on those rows it still holds; returns them (checked before a forward,
        so a worker whose lease ran out never sends what another worker now owns)."""
        now = time.time()
        held: list[str] = []
        with self._tx() as db:
            for instance_id in instance_ids:
                cursor = db.execute(
                    "UPDATE queue SET lease_until = ? WHERE instance_id = ? AND lease_owner = ? "
                    "AND lease_until > ?",
                    (now + lease_s, instance_id, owner, now),
                )
                if cursor.rowcount == 1:
                    held.append(instance_id)
        return held

    def release(self, owner: str, instance_ids: list[str]) -> None:
        """End ``owner``'s leases on these rows (handled, or put back for later)."""
        with self._tx() as db:
            db.executemany(
                "UPDATE queue SET lease_owner = NULL, lease_until = NULL "
                "WHERE instance_id = ? AND lease_owner = ?",
                [(i, owner) for i in instance_ids],
            )

    def get(self, instance_id: str) -> Item | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM queue WHERE instance_id = ?", (instance_id,)
            ).fetchone()
        return Item(*row) if row else None

    def update(self, instance_id: str, **fields: Any) -> None:
        unknown = set(fields) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown queue columns {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._tx() as db:
            db.execute(
                f"UPDATE queue SET {assignments} WHERE instance_id = ?", (*fields.values(), instance_id)
            )

    def retry_later(
        self, instance_id: str, error: str, *, base_s: float, cap_s: float, max_attempts: int | None = None
    ) -> float | None:
        """Back off exponentially (base·2^attempts, capped); returns the delay, or None when this was
        the last of ``max_attempts`` and the row became a dead letter."""
        with self._tx() as db:
            (attempts,) = db.execute(
                "SELECT attempts FROM queue WHERE instance_id = ?", (instance_id,)
            ).fetchone()
            if max_attempts is not None and attempts + 1 >= max_attempts:
                db.execute(
                    "UPDATE queue SET attempts = attempts + 1, state = 'dead', last_error = ?, "
                    "done_at = ? WHERE instance_id = ?",
                    (error, time.time(), instance_id),
                )
                return None
            delay = min(cap_s, base_s * 2**attempts)
            db.execute(
                "UPDATE queue SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
                "WHERE instance_id = ?",
                (time.time() + delay, error, instance_id),
            )
        return float(delay)

    def defer(self, instance_id: str, error: str, delay_s: float) -> None:
        """Try again after ``delay_s`` without spending an attempt: the fault was not this instance's
        (the model server or Orthanc unreachable)."""
        self.update(instance_id, next_attempt_at=time.time() + delay_s, last_error=error)

    def dead_letters(self) -> list[Item]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM queue WHERE state = 'dead' ORDER BY enqueued_at"
            ).fetchall()
        return [Item(*row) for row in rows]

    def replay(self, key: str | None = None) -> list[str]:
        """Send dead letters through routing again (``key``: a SOP hash or Orthanc id; None: all), with
        fresh attempts; a classification already made is kept. Returns the instance ids."""
        where, args = (
            ("state = 'dead'", ())
            if key is None
            else (
                "state = 'dead' AND (sop_hash = ? OR instance_id = ?)",
                (key, key),
            )
        )
        with self._tx() as db:
            ids = [r[0] for r in db.execute(f"SELECT instance_id FROM queue WHERE {where}", args)]
            db.executemany(
                "UPDATE queue SET state = 'pending', attempts = 0, next_attempt_at = 0, done_at = NULL, "
                "lease_owner = NULL, lease_until = NULL WHERE instance_id = ?",
                [(i,) for i in ids],
            )
        return ids

    # --- review -----------------------------------------------------------------------------------
    def find(self, key: str) -> Item | None:
        """The row a SOP hash (or an Orthanc instance id) names."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM queue WHERE sop_hash = ? OR instance_id = ? LIMIT 1",
                (key, key),
            ).fetchone()
        return Item(*row) if row else None

    def finished(self, *, site: str | None = None) -> list[Item]:
        """Rows routing is done with (delivered, kept, or dead letters), oldest first."""
        where, args = "state IN ('done', 'dead')", tuple[str, ...]()
        if site is not None:
            where, args = (f"{where} AND site_id = ?", (site,))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM queue WHERE {where} ORDER BY enqueued_at", args
            ).fetchall()
        return [Item(*row) for row in rows]

    def correct(self, instance_id: str, correction: dict[str, Any]) -> bool:
        """Append ``correction`` and send the instance through routing again by its label, in one
        transaction; False (nothing written) when routing is not done with the instance."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE queue SET reviewed_label = ?, state = 'pending', attempts = 0, next_attempt_at = 0, "
                "done_at = NULL, last_error = NULL WHERE instance_id = ? AND state IN ('done', 'dead')",
                (correction["label"], instance_id),
            )
            if cursor.rowcount != 1:
                return False
            db.execute(
                f"INSERT INTO corrections ({', '.join(CORRECTION_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(CORRECTION_COLUMNS))})",
                tuple(correction[name] for name in CORRECTION_COLUMNS),
            )
        return True

    def corrections(self) -> list[dict[str, Any]]:
        """Every correction, oldest first."""
        with self._lock:
            cursor = self._db.execute(
                f"SELECT seq, {', '.join(CORRECTION_COLUMNS)} FROM corrections ORDER BY seq"
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def delivered_to(self, instance_id: str) -> set[str]:
        """The destinations this instance has reached (a reviewed label never sends it twice)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT destination FROM audit WHERE instance_id = ? AND outcome = 'delivered'",
                (instance_id,),
            ).fetchall()
        return {str(row[0]) for row in rows}

    def study_labels(self, study_id: str) -> set[str]:
        """Labels the model gave the study's instances so far (for the conflict flag)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT body_part FROM queue WHERE study_id = ? AND body_part IS NOT NULL "
                "AND body_part != 'unrouted'",
                (study_id,),
            ).fetchall()
        return {row[0] for row in rows}

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM queue GROUP BY state").fetchall()
        return {state: n for state, n in rows}

    def stats(self, now: float | None = None) -> QueueStats:
        now = time.time() if now is None else now
        with self._lock:
            by_state = dict(self._db.execute("SELECT state, COUNT(*) FROM queue GROUP BY state").fetchall())
            oldest, attempts = self._db.execute(
                "SELECT MIN(MAX(enqueued_at, next_attempt_at)), COALESCE(SUM(attempts), 0) FROM queue "
                "WHERE state IN ('pending', 'forwarding') AND next_attempt_at <= ?",
                (now,),
            ).fetchone()
            delivered = dict(
                self._db.execute(
                    "SELECT destination, COUNT(*) FROM audit WHERE outcome = 'delivered' GROUP BY destination"
                ).fetchall()
            )
        return QueueStats(
            by_state=by_state,
            oldest_due_age_s=0.0 if oldest is None else max(0.0, now - oldest),
            attempts=int(attempts),
            dead=by_state.get("dead", 0),
            delivered={str(k): int(v) for k, v in delivered.items()},
        )

    def known(self, instance_ids: list[str]) -> set[str]:
        found: set[str] = set()
        with self._lock:
            for offset in range(0, len(instance_ids), 500):
                chunk = instance_ids[offset : offset + 500]
                marks = ",".join("?" * len(chunk))
                found |= {
                    r[0]
                    for r in self._db.execute(
                        f"SELECT instance_id FROM queue WHERE instance_id IN ({marks})", chunk
                    )
                }
        return found

    # --- audit and worker state -----------------------------------------------------------------
    def audit(self, item: Item, outcome: str, detail: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO audit (at, instance_id, study_id, body_part, confidence, model_version, rule, "
                "routed_to, destination, outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    item.instance_id,
                    item.study_id,
                    item.body_part,
                    item.confidence,
                    item.model_version,
                    item.rule,
                    item.routed_to,
                    item.destination,
                    outcome,
                    detail,
                ),
            )

    def history(self, since: float | None = None) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._db.execute(
                "SELECT seq, at, instance_id, study_id, body_part, confidence, model_version, rule, "
                "routed_to, destination, outcome, detail FROM audit WHERE at >= ? ORDER BY seq",
                (since or 0.0,),
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def get_state(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        with self._lock:
            self._db.close()
