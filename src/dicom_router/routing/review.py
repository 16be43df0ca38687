"""The review worklist and reviewers' corrections: pure rules over the routing queue.

An instance is on the worklist when routing is done with it and it went to ``review`` (low confidence,
an error, a study conflict, a rule's choice) or became a dead letter, and nobody has labelled it yet. A
correction (``label``; ``accept``: the model was right; ``misrouted``: an instance routed automatically
that a destination reported wrong) is appended to the queue file's ``corrections`` table and sends the
instance through routing again by its label: the worker then forwards it once to where the rules send
that label, with the usual leases and confirmations (``Router._route``). Times are kept to the hour,
as the inference log keeps them. The CLI, the router's REST API and Orthanc's ``BodyPartReviewed``
metadata all come through ``correct``.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_router import LABELS
from dicom_router.monitoring.inference_log import coarse_time
from dicom_router.routing.queue import Item, RoutingQueue
from dicom_router.routing.rules import REVIEW

VIA = ("cli", "api", "orthanc")
"""Where a correction came from."""


class ReviewError(ValueError):
    """A correction that cannot be taken; ``status`` is its HTTP answer in the REST API."""

    status = 400


class UnknownInstance(ReviewError):
    status = 404


class StillRouting(ReviewError):
    status = 409


def on_worklist(item: Item) -> bool:
    """Routing is done with it, it is in review (or a dead letter), and no reviewer has labelled it."""
    return (
        item.reviewed_label is None
        and item.state in ("done", "dead")
        and (item.state == "dead" or item.routed_to == REVIEW)
    )


def reason(item: Item) -> str:
    """Why the instance is in review, in the words of the rule or the error."""
    if item.state == "dead":
        return f"dead letter: {item.last_error}"
    if item.routing_error is not None:
        return item.routing_error
    if item.rule == "unfamiliar" and item.novelty is not None:
        return f"rule unfamiliar (novelty {item.novelty:.2f}: unlike the model's training images)"
    return f"rule {item.rule}"


def hour(timestamp: float) -> str:
    return coarse_time(datetime.fromtimestamp(timestamp, UTC)).isoformat()


def entry(item: Item) -> dict[str, Any]:
    """One worklist (or suggestion) line: pseudonyms, the model's answer and the reason; no PHI."""
    return {
        "sop_hash": item.sop_hash,
        "instance_id": item.instance_id,
        "site_id": item.site_id,
        "scanner_id": item.scanner_id,
        "body_part": item.body_part,
        "confidence": item.confidence,
        "margin": item.margin,
        "novelty": item.novelty,
        "model_version": item.model_version,
        "routed_to": item.routed_to,
        "reason": reason(item) if on_worklist(item) else None,
        "at": hour(item.enqueued_at),
    }


def suggest(items: list[Item], n: int) -> list[Item]:
    """The ``n`` auto-routed, unreviewed instances a label would teach the model most: the lowest margin
    (top probability minus the runner-up) first, spread over sites and predicted classes (each group's
    least sure, then each group's second least sure, …), so one noisy site or one confusable class
    does not take the reviewer's whole hour and a class the model rarely predicts is still asked."""
    groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for item in items:
        if item.reviewed_label is None and item.routed_to not in (None, REVIEW) and item.margin is not None:
            groups[(item.site_id or "", item.body_part or "")].append(item)
    ranked = [
        (rank, item.margin, item.enqueued_at, item)
        for group in groups.values()
        for rank, item in enumerate(sorted(group, key=lambda i: (i.margin, i.enqueued_at)))
    ]
    ranked.sort(key=lambda r: (r[0], r[1], r[2]))
    return [r[3] for r in ranked[:n]]


def worklist(queue: RoutingQueue, *, site: str | None = None, suggest_n: int | None = None) -> list[Item]:
    """The worklist (oldest first), or with ``suggest_n`` the instances to label next."""
    finished = queue.finished(site=site)
    if suggest_n is not None:
        return suggest(finished, suggest_n)
    return [item for item in finished if on_worklist(item)]


def reviewed_labels(queue: RoutingQueue) -> dict[str, str]:
    """Each reviewed instance's newest label, by SOP hash (the inference log's ``sop_uid_hash``)."""
    return {
        str(i.sop_hash): str(i.reviewed_label) for i in queue.finished() if i.reviewed_label and i.sop_hash
    }


def correct(
    queue: RoutingQueue,
    key: str,
    label: str | None,
    *,
    reviewer: str,
    via: str,
    note: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """Record a reviewer's label for the instance ``key`` (SOP hash or Orthanc id; ``label`` None: accept
    the model's) and route it again by that label. Returns the stored correction."""
    if via not in VIA:
        raise ReviewError(f"via {via!r}: expected one of {', '.join(VIA)}")
    if not reviewer.strip():
        raise ReviewError("a correction needs a reviewer's name")
    item = queue.find(key)
    if item is None:
        raise UnknownInstance("no routed instance has that SOP hash or instance id")
    if item.state not in ("done", "dead"):
        raise StillRouting(f"still being routed ({item.state}); label it once it is done")
    if label is None:
        if item.body_part not in LABELS:
            raise ReviewError(f"the model gave no label to accept ({reason(item)}); give a label")
        label = item.body_part
    if label not in LABELS:
        raise ReviewError(f"label {label!r}: expected one of {', '.join(LABELS)}")
    auto_routed = (
        item.state == "done" and item.routed_to not in (None, REVIEW) and item.reviewed_label is None
    )
    kind = "accept" if label == item.body_part else "misrouted" if auto_routed else "label"
    correction = {
        "at": coarse_time(at or datetime.now(UTC)).isoformat(),
        "instance_id": item.instance_id,
        "sop_hash": item.sop_hash,
        "site_id": item.site_id,
        "scanner_id": item.scanner_id,
        "kind": kind,
        "label": label,
        "previous": item.body_part,
        "previous_confidence": item.confidence,
        "previous_route": item.routed_to,
        "model_version": item.model_version,
        "reviewer": reviewer.strip(),
        "via": via,
        "note": note,
    }
    if not queue.correct(item.instance_id, correction):
        raise StillRouting("routing took it up again meanwhile; try again once it is done")
    return correction


def export(queue: RoutingQueue, fetch: Callable[[str], bytes], out_dir: Path) -> dict[str, Any]:
    """Write every reviewed instance (its newest label) to ``out_dir`` as ``<sop hash>.dcm`` with a
    ``labels.csv`` (``file,label,label_source=review``): a labelled folder that ``ingest``
    de-identifies into catalog rows with ``label_source=review`` and ``train --with-reviewed`` adds.
    ``fetch`` reads an instance's DICOM file (Orthanc). Files already there are kept (idempotent);
    an instance deleted from Orthanc meanwhile is skipped and counted."""
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # identifiable DICOM: the raw zone
    rows: list[dict[str, str]] = []
    gone = 0
    for item in queue.finished():
        if item.reviewed_label is None or item.sop_hash is None:
            continue
        name = f"{item.sop_hash}.dcm"
        target = out_dir / name
        if not target.is_file():
            try:
                data = fetch(item.instance_id)
            except LookupError:
                gone += 1
                continue
            partial = target.with_suffix(".part")
            partial.write_bytes(data)
            partial.replace(target)
        rows.append({"file": name, "label": item.reviewed_label, "label_source": "review"})
    with (out_dir / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "label_source"])
        writer.writeheader()
        writer.writerows(rows)
    return {"exported": len(rows), "gone": gone, "folder": str(out_dir)}


def api(queue: RoutingQueue, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
    """The REST API's answer (status, JSON document) to an authenticated request under ``/review``:

    - ``GET /review[?site=S][&suggest=N]``: the worklist (or suggestions), as ``review list --json``;
    - ``GET /review/corrections``: every correction, oldest first;
    - ``POST /review/SOP_HASH/label`` ``{"label", "reviewer", "note"?}`` and
      ``POST /review/SOP_HASH/accept`` ``{"reviewer", "note"?}``: the stored correction.
    """
    parts = [p for p in path.split("/") if p]
    try:
        if method == "GET" and parts == ["review"]:
            suggest_n = _count(query["suggest"]) if "suggest" in query else None
            items = worklist(queue, site=query.get("site"), suggest_n=suggest_n)
            return 200, [entry(item) for item in items]
        if method == "GET" and parts == ["review", "corrections"]:
            return 200, queue.corrections()
        if method == "POST" and len(parts) == 3 and parts[0] == "review" and parts[2] in ("label", "accept"):
            if not isinstance(body, dict) or not isinstance(body.get("reviewer"), str):
                raise ReviewError('the body must be a JSON object with "reviewer" (and "label" to label)')
            label = body.get("label") if parts[2] == "label" else None
            if parts[2] == "label" and not isinstance(label, str):
                raise ReviewError('"label": one of ' + ", ".join(LABELS))
            note = body.get("note")
            correction = correct(
                queue,
                parts[1],
                label,
                reviewer=body["reviewer"],
                via="api",
                note=note if isinstance(note, str) else None,
            )
            return 200, correction
    except ReviewError as exc:
        return exc.status, {"error": {"type": type(exc).__name__, "message": str(exc)}}
    return 404, {"error": {"type": "NotFound", "message": f"{method} {path}: no such review endpoint"}}


def _count(text: str) -> int:
    """``?suggest=N``: a positive count, else the API's 400."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ReviewError("suggest: a positive count")
    return n
