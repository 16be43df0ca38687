"""Scoring bundles on labelled DICOM and the promotion gate's orchestration.

Both candidate and champion are re-scored, through the serving code path, on the candidate's persisted
test split, so the comparison is like for like whatever each model was trained on.

On a live deployment (a champion exists) the policy ``promotion_approval=required`` turns a passed
gate into a promotion *request*: a person approves (``approve``) or rejects it, and only an approval
moves ``champion``. A forced promotion (rollback) is an operator's act and moves it at once; every one
of these is in the history.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from mlflow.entities.model_registry import ModelVersion

from dicom_router import LABELS
from dicom_router.calibration import familiar_mask
from dicom_router.catalog import ingest, read_catalog
from dicom_router.config import Settings
from dicom_router.dicom.errors import DicomInputError
from dicom_router.evaluate import evaluation_report
from dicom_router.inference import Bundle, Prediction
from dicom_router.monitoring.compare import compare
from dicom_router.monitoring.inference_log import read_window
from dicom_router.registry import (
    CHALLENGER,
    RequestError,
    Scores,
    champion_version,
    decide,
    decision_document,
    load_bundle,
    model_version,
    newest_candidate,
    now,
    pending_request,
    record_decision,
    record_request,
    scores_from_report,
    set_challenger,
)
from dicom_router.routing.queue import RoutingQueue
from dicom_router.storage import open_store


def locate(settings: Settings, card: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
    """A bundle's test split with object keys again (``source``, items ``key``, ``label``,
    ``sop_uid_hash``): the card holds only pseudonyms, so keys are re-found by ``sop_uid_hash`` in the
    training catalog, or (a model trained from folders) by cataloging its source's headers."""
    if card.get("catalog"):
        frame, source = read_catalog(str(card["catalog"]), settings)
    else:
        source = str(card["source"])
        with tempfile.TemporaryDirectory() as tmp:
            frame = ingest(source, f"{tmp}/catalog.parquet", settings, progress=False).catalog
    keys = dict(zip(frame["sop_uid_hash"].astype(str), frame["key"].astype(str), strict=True))
    items = card["test_items"]
    missing = [item["sop_uid_hash"] for item in items if item["sop_uid_hash"] not in keys]
    if missing:
        raise ValueError(f"{len(missing)} test images are no longer in {source} (e.g. {missing[0]})")
    return source, [{**item, "key": keys[item["sop_uid_hash"]]} for item in items]


def score(
    bundle: Bundle,
    source: str,
    items: Sequence[dict[str, str]],
    settings: Settings,
    *,
    review_threshold: float | None = None,
    above_novelty: float | None = None,
) -> dict[str, Any]:
    """The contract's ``evaluate`` document for ``items`` (``key``, ``label``, ``sop_uid_hash``) under
    ``source`` (with the abstention figures at ``review_threshold`` when given, images whose novelty
    is above ``above_novelty`` going to review); errors name the pseudonym, not the key."""
    store = open_store(source, settings)
    payloads = [(item["sop_uid_hash"], store.read(item["key"])) for item in items]
    results, ms = bundle.predict_items(payloads, max_pixels=settings.max_image_pixels)
    truth, probabilities, novelty, errors = [], [], [], []
    for item, result in zip(items, results, strict=True):
        if isinstance(result, DicomInputError):
            errors.append({"file": result.path, **result.as_dict()})
        else:
            truth.append(LABELS.index(item["label"]))
            probabilities.append([result.probabilities[label] for label in LABELS])
            novelty.append(result.novelty)
    if not truth:
        raise ValueError(f"none of the {len(items)} test images could be classified")
    known = [n for n in novelty if n is not None]  # a bundle without novelty: no check
    return evaluation_report(
        np.array(truth),
        np.array(probabilities),
        LABELS,
        ms,
        errors=errors,
        review_threshold=review_threshold,
        familiar=familiar_mask(known if len(known) == len(novelty) else None, above_novelty),
    )


def promote(
    settings: Settings,
    *,
    version: str | None = None,
    force: bool = False,
    record: bool = True,
    request: bool = False,
    reviewer: str | None = None,
) -> dict[str, Any]:
    """Run the gate for ``version`` (default: the newest candidate) and record the decision
    (``record=False``: only say what the gate would decide, e.g. for a pipeline's condition).

    ``promoted`` says whether ``champion`` moved, ``passed`` what the gate said. A passed gate that
    needs a person (``request``, or the approval policy on a live deployment) files a request instead
    of moving the alias; its id is ``request``."""
    name = settings.registered_model
    candidate = (
        newest_candidate(settings)
        if version is None
        else model_version(settings, f"models:/{name}/{version}")
    )
    champion = champion_version(settings)
    bundle = load_bundle(settings, f"models:/{name}/{candidate.version}")
    source, items = locate(settings, bundle.card)
    candidate_scores = scores_from_report(str(candidate.version), score(bundle, source, items, settings))
    champion_scores: Scores | None = None
    passed, reason = False, ""
    unchanged = champion is not None and champion.version == candidate.version
    if unchanged:
        passed, reason = True, f"version {candidate.version} is already the champion: nothing changes"
    else:
        if champion is not None:
            current = load_bundle(settings, f"models:/{name}/{champion.version}")
            if current.labels != bundle.labels:
                reason = f"the champion's labels {current.labels} differ from the candidate's {bundle.labels}"
            else:
                champion_scores = scores_from_report(
                    str(champion.version), score(current, source, items, settings)
                )
        if not reason:
            passed, reason = decide(
                candidate_scores, champion_scores, margin=settings.gate_margin, floor=settings.gate_floor
            )
    if force and not passed:
        passed, reason = True, f"forced by an operator (the gate said: {reason})"
    awaits = passed and not force and not unchanged and (request or needs_approval(settings, champion))
    if awaits:
        reason = f"the gate passed ({reason}); awaiting a person's approval"
    decision = decision_document(
        passed and not awaits, candidate_scores, champion_scores, reason, forced=force
    )
    decision |= {"passed": passed, "reviewer": reviewer}
    if record and awaits:
        decision["evidence"] = live_evidence(settings, candidate, champion)
        decision["request"] = record_request(settings, str(candidate.version), decision)
    elif record:
        record_decision(settings, str(candidate.version), decision, bool(decision["promoted"]))
    return decision


SHADOW_WINDOW = timedelta(days=7)
"""How far back a request looks for the candidate's answers in shadow."""


def live_evidence(
    settings: Settings, candidate: ModelVersion, champion: ModelVersion | None
) -> dict[str, Any]:
    """What a request shows beside the held-out figures: the candidate's record in shadow over the last
    week (agreement with the champion and accuracy of both on reviewed labels, per site and scanner;
    reviewed labels where the routing queue is at hand) and the champion's latest drift verdict."""
    shadow: dict[str, Any] | None = None
    if "shadow.at" in candidate.tags:
        since = datetime.now(UTC) - SHADOW_WINDOW
        try:
            records = read_window(settings.inference_log, settings, since=since).frame
        except Exception as exc:  # the figures are evidence for a person: say they are missing, go on
            shadow = {"error": f"{exc.__class__.__name__}: {exc}"}
        else:
            mine = records[records["shadow_version"] == f"{candidate.name}/{candidate.version}"]
            reviewed = {}
            if settings.routing_queue.is_file():
                queue = RoutingQueue(settings.routing_queue)
                reviewed = {
                    str(i.sop_hash): str(i.reviewed_label) for i in queue.finished() if i.reviewed_label
                }
            document = compare(mine, reviewed, since)
            shadow = {
                "since": document["since"],
                "overall": document["overall"],
                "groups": document["groups"],
            }
    drift = None
    if champion is not None:
        drift = {
            k.removeprefix("drift."): v for k, v in champion.tags.items() if k.startswith("drift.")
        } or None
    return {"shadow": shadow, "drift": drift}


def needs_approval(settings: Settings, champion: object | None) -> bool:
    """The policy: a person approves anything that changes the champion of a live deployment."""
    return settings.promotion_approval == "required" and champion is not None


def settle(
    settings: Settings, request: str, *, approve: bool, reviewer: str, note: str | None = None
) -> dict[str, Any]:
    """Approve (``champion`` moves to the request's version) or reject (it stays) a pending request,
    recorded with who and why. An approval is refused when the champion changed since the request
    was filed: its figures compare against another model, so it must be requested again."""
    if not reviewer.strip():
        raise RequestError("approving or rejecting needs --reviewer NAME")
    filed = pending_request(settings, request)
    if approve:
        champion = champion_version(settings)
        now_version = None if champion is None else str(champion.version)
        then = (filed.get("champion") or {}).get("version")
        if now_version != then:
            raise RequestError(
                f"request {request}: the champion changed since it was filed (then {then}, now "
                f"{now_version}); run promote --request again"
            )
    verb = "approved" if approve else "rejected"
    decision = filed | {
        "action": "approve" if approve else "reject",
        "promoted": approve,
        "reviewer": reviewer.strip(),
        "request": request,
        "reason": f"{verb} by {reviewer.strip()}" + (f": {note}" if note else ""),
        "at": now(),
    }
    record_decision(settings, str(filed["candidate"]["version"]), decision, approve)
    return decision


def shadow(settings: Settings, version: str, *, reviewer: str | None = None) -> dict[str, Any]:
    """Put ``version`` in shadow (alias ``challenger``): served beside the champion, routing nothing."""
    name = settings.registered_model
    candidate = model_version(settings, f"models:/{name}/{version}")
    champion = champion_version(settings)
    decision = {
        "action": "shadow",
        "promoted": False,
        "candidate": {"version": str(candidate.version)},
        "champion": None if champion is None else {"version": str(champion.version)},
        "reason": f"version {candidate.version} in shadow as {CHALLENGER}; it routes nothing",
        "forced": False,
        "reviewer": reviewer,
        "at": now(),
    }
    set_challenger(settings, str(candidate.version), decision)
    return decision


def prediction_record(path: str, result: Prediction | DicomInputError, bundle: Bundle) -> dict[str, Any]:
    """The contract's ``predict`` JSON entry."""
    if isinstance(result, DicomInputError):
        return {"file": path, "error": result.as_dict()}
    return {"file": path, **result.as_dict(), "model": bundle.name, "version": bundle.version}
