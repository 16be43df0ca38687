"""The routing worker: queue → Orthanc file → model server → rules → metadata → asynchronous forward.

Each queued instance is handled on its own (a thread pool lets the model server batch concurrent
ones) and forwarded in a store job of its own; whatever cannot be done now goes back to the queue
with exponential backoff, so nothing is lost and nothing blocks: an outage (model server or Orthanc
unreachable) spends no attempt, a failure of the instance's own does, and after
``route_max_attempts`` it is a dead letter in review. The classification is kept on the queue row,
so a retried forward never reclassifies, and the metadata writes are idempotent. A restart replays
Orthanc's ``/changes`` log from the last position seen, so instances stored while the worker (or the
hook) was away are found again; the same log shows a reviewer's ``BodyPartReviewed`` set in Orthanc.

An instance a reviewer labelled (``review.correct``) comes back with ``reviewed_label``: it is routed
by that label (no model, no confidence threshold) and forwarded only to a destination it has not
reached yet.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from dicom_router import LABELS
from dicom_router.config import Settings
from dicom_router.dicom.deid import load_key, scanner_id, site_id, uid_hash
from dicom_router.dicom.errors import DicomInputError
from dicom_router.orthanc.config import Peer
from dicom_router.orthanc.rest import (
    ForwardFailed,
    InstanceGone,
    OrthancClient,
    OrthancUnavailable,
    UnknownModality,
)
from dicom_router.routing import review
from dicom_router.routing.eligibility import projection_radiograph
from dicom_router.routing.queue import Item, RoutingQueue
from dicom_router.routing.rules import REVIEW, UNROUTED, Decision, RoutingRules, Subject, decide
from dicom_router.serving.client import Classification, ModelClient, ModelFailed, ModelUnavailable

log = logging.getLogger(__name__)

CHANGES_SEQ = "orthanc_changes_seq"
REVIEWED = "BodyPartReviewed"
"""The Orthanc metadata a reviewer sets on an instance to label it."""
DESTINATIONS_CHECK_S = 30.0
HEADER_KEYWORDS = ("SOPClassUID", "Modality", "NumberOfFrames")

ClassificationHook = Callable[[str, bytes, Classification], None]
"""Called after each model answer (instance id, DICOM bytes, answer): the inference log's entry point."""


class Retry(Exception):
    """Try this instance again later; the message says why."""


def read_header(data: bytes) -> Dataset:
    """The header of an instance Orthanc returned (pixels are never parsed here)."""
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise Retry(f"Orthanc returned an unreadable file: {exc.__class__.__name__}") from None


def header_tags(dataset: Dataset, keywords: list[str]) -> dict[str, str]:
    """The header values rules and eligibility read, as strings."""
    tags: dict[str, str] = {}
    for keyword in {*HEADER_KEYWORDS, *keywords}:
        value = dataset.get(keyword)
        if value is not None and not isinstance(value, bytes | pydicom.Sequence):
            tags[keyword] = (
                "\\".join(map(str, value)) if isinstance(value, pydicom.multival.MultiValue) else str(value)
            )
    return tags


@dataclass
class Router:
    settings: Settings
    rules: RoutingRules
    orthanc: OrthancClient
    model: ModelClient
    queue: RoutingQueue
    on_classified: ClassificationHook | None = None

    def __post_init__(self) -> None:
        self._keywords = self.rules.tag_keywords()
        self._key = load_key(self.settings)
        self._destinations_checked = 0.0
        self._last_recover = 0.0
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.settings.route_concurrency))
        self._outages = 0
        """Consecutive outages (model server or Orthanc unreachable): the wait grows with them."""
        self.last_pass = time.monotonic()
        """When the loop last started a pass (``/health``: a hung router is not alive)."""
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """This worker's name on the queue rows it leases."""

    # --- finding work ---------------------------------------------------------------------------
    def recover(self) -> int:
        """Enqueue every instance Orthanc logged since the last position that the queue lacks."""
        seq = int(self.queue.get_state(CHANGES_SEQ) or 0)
        found: list[str] = []
        relabelled: list[str] = []
        while True:
            page = self.orthanc.changes(seq)
            if int(page["Last"]) < seq:  # a new Orthanc database: its log starts again
                seq = 0
                continue
            found += [c["ID"] for c in page["Changes"] if c["ChangeType"] == "NewInstance"]
            relabelled += [
                c["ID"]
                for c in page["Changes"]
                if c["ChangeType"] == "UpdatedMetadata" and c["ResourceType"] == "Instance"
            ]
            seq = int(page["Last"])
            if page["Done"]:
                break
        known = self.queue.known(found)
        missing = [i for i in dict.fromkeys(found) if i not in known]
        for instance_id in missing:
            self.queue.enqueue(instance_id)
        self._take_reviews(dict.fromkeys(relabelled))
        self.queue.set_state(CHANGES_SEQ, str(seq))
        self._last_recover = time.monotonic()
        if missing:
            log.info("recovered %d stored instances missing from the queue", len(missing))
        return len(missing)

    def _take_reviews(self, instance_ids: Iterable[str]) -> None:
        """Labels reviewers set as ``BodyPartReviewed`` in Orthanc on worklist instances become
        corrections (the router's own metadata writes also show in the log: only worklist rows are read)."""
        for instance_id in instance_ids:
            item = self.queue.get(instance_id)
            if item is None or not review.on_worklist(item):
                continue
            label = self.orthanc.metadata("instances", instance_id).get(REVIEWED)
            if label is None:
                continue
            if label not in LABELS:
                log.warning("%s: %s is not a label; expected one of %s", instance_id, REVIEWED, LABELS)
                continue
            try:
                review.correct(self.queue, instance_id, label, reviewer="orthanc-explorer", via="orthanc")
            except review.ReviewError as exc:
                log.warning("%s: %s not taken: %s", instance_id, REVIEWED, exc)
            else:
                log.info("%s: labelled %s in Orthanc; routing it by that label", instance_id, label)

    def ensure_destinations(self) -> None:
        """Declare the rules' destinations in Orthanc (it forgets REST-declared modalities on restart)."""
        if time.monotonic() - self._destinations_checked < DESTINATIONS_CHECK_S:
            return
        known = set(self.orthanc.modalities())
        for name, destination in self.rules.destinations.items():
            if name not in known:
                self.orthanc.put_modality(name, Peer(destination.aet, destination.host, destination.port))
        self._destinations_checked = time.monotonic()

    # --- the loop --------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        log.info("routing %s → %s with %d rules", self.orthanc.url, self.model.url, len(self.rules.rules))
        while not stop.is_set():
            self.last_pass = time.monotonic()
            try:
                if time.monotonic() - self._last_recover > self.settings.route_changes_poll_s:
                    self.recover()
                handled = self.step()
            except OrthancUnavailable as exc:  # unreachable, or refusing our credentials: wait, never exit
                delay = self._outage_delay()
                log.warning("Orthanc unavailable (%s); retrying in %.1f s", exc, delay)
                stop.wait(delay)
                continue
            except Exception:  # a bug in one pass must not end the router: log it and go on
                log.exception("routing pass failed; retrying")
                stop.wait(self._outage_delay())
                continue
            if not handled:
                stop.wait(self.settings.route_poll_s)
        self._pool.shutdown(wait=True)

    def drain(self, timeout_s: float) -> dict[str, int]:
        """Route until nothing is waiting (or the timeout): ``route --once`` and tests."""
        deadline = time.monotonic() + timeout_s
        self.recover()
        while time.monotonic() < deadline:
            self.step()
            counts = self.queue.counts()
            if not counts.get("pending") and not counts.get("forwarding"):
                break
            time.sleep(self.settings.route_poll_s)
        return self.queue.counts()

    def step(self) -> int:
        """Claim due instances (a lease, so no other worker takes them), handle each once, release
        them; returns how many were claimed.

        New instances are classified concurrently (so the model server can batch them); decided ones
        are then forwarded concurrently, one C-STORE per instance.
        """
        limit = max(8, 4 * self.settings.route_concurrency)
        items = self.queue.claim(self.owner, limit, self.settings.route_lease_s)
        if not items:
            return 0
        try:
            self.ensure_destinations()
            fresh = [i for i in items if i.state == "pending"]
            list(self._pool.map(lambda item: self._guard([item], partial(self._route, item)), fresh))
            decided = [
                current
                for current in filter(None, (self.queue.get(i.instance_id) for i in items))
                if current.state == "forwarding" and current.next_attempt_at <= time.time()
            ]
            list(self._pool.map(lambda item: self._guard([item], partial(self._forward, item)), decided))
        finally:
            self.queue.release(self.owner, [i.instance_id for i in items])
        return len(items)

    def _guard(self, items: list[Item], action: Callable[[], None]) -> None:
        """Run ``action`` on ``items``. An outage (model server or Orthanc unreachable) puts them back
        without spending an attempt; a failure of their own spends one, and the last ends in review."""
        try:
            action()
        except InstanceGone:
            for item in items:
                self._gone(item)
        except (ModelUnavailable, OrthancUnavailable) as exc:
            delay = self._outage_delay()
            for item in items:
                self.queue.defer(item.instance_id, f"{exc.__class__.__name__}: {exc}", delay)
            log.warning("%d instance(s) wait %.1f s: %s", len(items), delay, exc)
        except (Retry, ModelFailed, UnknownModality) as exc:
            if isinstance(exc, UnknownModality):
                self._destinations_checked = 0.0
            self._retry(items, exc)
        except Exception as exc:  # a bug must not stop the queue: back off and keep the instances
            log.exception("%s: unexpected failure; will retry", ", ".join(i.instance_id for i in items))
            self._retry(items, exc)

    def _outage_delay(self) -> float:
        """The next wait of an outage: base·2^(outages so far), capped; a success resets it."""
        self._outages += 1
        base, cap = self.settings.route_retry_base_s, self.settings.route_retry_cap_s
        return float(min(cap, base * 2 ** min(self._outages, 32)))

    def _gone(self, item: Item) -> None:
        self.queue.update(item.instance_id, state="done", done_at=time.time(), last_error="deleted")
        self.queue.audit(item, "gone", "deleted from Orthanc before it was routed")

    def _retry(self, items: list[Item], exc: Exception) -> None:
        reason = f"{exc.__class__.__name__}: {exc}"
        delays: list[float] = []
        for item in items:
            delay = self.queue.retry_later(
                item.instance_id,
                reason,
                base_s=self.settings.route_retry_base_s,
                cap_s=self.settings.route_retry_cap_s,
                max_attempts=self.settings.route_max_attempts,
            )
            if delay is None:
                self._dead_letter(item, reason)
            else:
                delays.append(delay)
        if delays:
            log.info("%d instance(s): retry in %.1f s (%s)", len(delays), max(delays), reason)

    def _dead_letter(self, item: Item, reason: str) -> None:
        """Out of attempts: marked for review in Orthanc (best effort) and kept for ``--replay``."""
        log.warning("%s: dead letter after %d attempts (%s)", item.instance_id, item.attempts + 1, reason)
        self.queue.audit(item, "dead-letter", reason)
        try:
            self.orthanc.set_metadata("instances", item.instance_id, "RoutedTo", REVIEW)
            self.orthanc.set_metadata("instances", item.instance_id, "RoutingError", f"DeadLetter: {reason}")
        except (OrthancUnavailable, InstanceGone) as exc:
            log.warning("%s: could not mark the dead letter in Orthanc: %s", item.instance_id, exc)

    # --- one instance ----------------------------------------------------------------------------
    def _route(self, item: Item) -> None:
        data = self.orthanc.instance_file(item.instance_id)
        dataset = read_header(data)
        tags = header_tags(dataset, self._keywords)
        if item.sop_hash is None:  # how ``route --replay`` and reviewers name it, without PHI
            self.queue.update(
                item.instance_id,
                sop_hash=uid_hash(self._key, dataset, "SOPInstanceUID"),
                site_id=site_id(self._key, dataset),
                scanner_id=scanner_id(self._key, dataset),
            )
        if item.reviewed_label is not None:
            self._route_reviewed(item, tags)
            return
        if not item.classified:
            item = self._classify(item, data, tags)
        study_id = item.study_id or self.orthanc.parent_study(item.instance_id)
        labels = self.queue.study_labels(study_id)
        conflict = len(labels) > 1
        if conflict:
            self.orthanc.set_metadata("studies", study_id, "BodyPartConflict", ",".join(sorted(labels)))
        calling_aet = self.orthanc.metadata("instances", item.instance_id).get("RemoteAET")
        decision = decide(
            self.rules,
            Subject(
                body_part=item.body_part,
                confidence=item.confidence,
                novelty=item.novelty,
                review_threshold=item.review_threshold,
                tags=tags,
                calling_aet=calling_aet,
                study_conflict=conflict,
                error=item.routing_error,
            ),
        )
        self._write_metadata(item, decision.routed_to)
        self._decided(item, decision)

    def _route_reviewed(self, item: Item, tags: dict[str, str]) -> None:
        """Route by the reviewer's label: a person vouches for it, so no threshold, error, study conflict
        or review rule sends it back to review; a destination it already reached is not sent to again."""
        calling_aet = self.orthanc.metadata("instances", item.instance_id).get("RemoteAET")
        label = str(item.reviewed_label)
        subject = Subject(body_part=label, confidence=1.0, tags=tags, calling_aet=calling_aet)
        decision = decide(self.rules, subject, reviewed=True)
        self.orthanc.set_metadata("instances", item.instance_id, REVIEWED, label)
        self.orthanc.set_metadata("instances", item.instance_id, "RoutedTo", decision.routed_to)
        detail = f"reviewed: {label}"
        if decision.destination in self.queue.delivered_to(item.instance_id):
            detail += f"; already delivered to {decision.destination}"
            decision = replace(decision, destination=None)
        self._decided(item, decision, detail)

    def _decided(self, item: Item, decision: Decision, detail: str | None = None) -> None:
        """Record the decision; forward at the end of this step, or finish when there is nowhere to go."""
        self.queue.update(
            item.instance_id,
            rule=decision.rule,
            routed_to=decision.routed_to,
            destination=decision.destination,
        )
        decided = self.queue.get(item.instance_id)
        assert decided is not None
        self.queue.audit(decided, "decided", detail)
        if decision.destination is None:
            self.queue.update(item.instance_id, state="done", done_at=time.time())
            self.queue.audit(decided, "kept", "no destination: stays in Orthanc")
        else:  # forwarded with the others for the same destination at the end of this step
            self.queue.update(item.instance_id, state="forwarding", next_attempt_at=0.0)

    def _classify(self, item: Item, data: bytes, tags: dict[str, str]) -> Item:
        eligible, reason = projection_radiograph(tags)
        fields: dict[str, Any] = {"study_id": self.orthanc.parent_study(item.instance_id)}
        if not eligible:
            fields |= {"body_part": UNROUTED}
            log.info("%s: unrouted (%s)", item.instance_id, reason)
        else:
            try:
                answer = self.model.classify(
                    data, path=item.instance_id, embedding=self.on_classified is not None
                )
            except DicomInputError as exc:
                fields |= {"routing_error": f"{exc.type}: {exc.reason}"}
            else:
                self._outages = 0
                top, runner_up = sorted(answer.probabilities.values(), reverse=True)[:2]
                fields |= {
                    "body_part": answer.label,
                    "confidence": answer.confidence,
                    "novelty": answer.novelty,
                    "review_threshold": answer.review_threshold,
                    "margin": top - runner_up,
                    "model_version": answer.model_version,
                }
                if self.on_classified is not None:
                    self.on_classified(item.instance_id, data, answer)
        self.queue.update(item.instance_id, **fields)
        classified = self.queue.get(item.instance_id)
        assert classified is not None
        return classified

    def _write_metadata(self, item: Item, routed_to: str) -> None:
        """The contract's UserMetadata; written before forwarding, so a PACS sees it with the image."""
        values: dict[str, str] = {"RoutedTo": routed_to}
        if item.body_part is not None:
            values["BodyPart"] = item.body_part
        if item.confidence is not None:
            values["BodyPartConfidence"] = f"{item.confidence:.4f}"
        if item.novelty is not None:
            values["BodyPartNovelty"] = f"{item.novelty:.4f}"
        if item.model_version is not None:
            values["ModelVersion"] = f"{self.settings.registered_model}/{item.model_version}"
        if item.routing_error is not None:
            values["RoutingError"] = item.routing_error
        for name, value in values.items():
            self.orthanc.set_metadata("instances", item.instance_id, name, value)

    def _forward(self, item: Item) -> None:
        """One C-STORE of this instance alone, sent only while this worker still holds it (lease renewed
        first) and waited for here; a refused store is retried alone, never re-sending others.

        ``forward_started`` is committed before the store and cleared with its outcome, so a row that
        still has it when claimed lost its answer (a crash mid-send): Orthanc's job history then says
        whether that store went through, and only a store that did not is sent again."""
        if not self.queue.hold(self.owner, [item.instance_id], self.settings.route_lease_s):
            return
        if item.forward_started is not None:
            outcome = self.orthanc.store_outcomes().get(item.instance_id)
            if outcome == "Success":
                self._delivered(item, "confirmed from Orthanc's job history after a lost answer")
                return
            if outcome in ("Pending", "Running", "Retry"):
                raise OrthancUnavailable(f"an earlier store of {item.instance_id} is still {outcome}")
        self.queue.update(item.instance_id, forward_started=time.time())
        try:
            self.orthanc.store(str(item.destination), item.instance_id)
        except ForwardFailed as exc:  # Orthanc answered: the outcome is known
            self.queue.update(item.instance_id, forward_started=None)
            self.queue.audit(item, "forward-failed", str(exc))
            raise Retry(f"forward to {item.destination} failed: {exc}") from None
        self._delivered(item, str(item.destination))

    def _delivered(self, item: Item, detail: str) -> None:
        self.queue.update(
            item.instance_id, state="done", done_at=time.time(), last_error=None, forward_started=None
        )
        self.queue.audit(item, "delivered", detail)
