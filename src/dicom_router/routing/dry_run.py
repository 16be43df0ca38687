"""``route --dry-run``: which rule each file would hit, classified locally the way the server would.

The model runs in-process through ``Bundle.predict_items`` (the server's preprocessing); the calling AET
and the study-conflict flag are unknown for a loose file, so rules on them do not match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicom_router.config import Settings
from dicom_router.dicom.errors import DicomInputError, NotDicom
from dicom_router.routing.eligibility import projection_radiograph
from dicom_router.routing.rules import UNROUTED, RoutingRules, Subject, decide, explain
from dicom_router.routing.worker import Retry, header_tags, read_header


def dry_run(
    settings: Settings, rules: RoutingRules, files: list[tuple[str, bytes]], model_uri: str
) -> list[dict[str, Any]]:
    """One record per file: classification, decision and why each earlier rule did not match."""
    from dicom_router.registry import load_bundle

    subjects: dict[str, Subject] = {}
    to_classify: list[tuple[str, bytes]] = []
    tags_by_file: dict[str, dict[str, str]] = {}
    for path, data in files:
        try:
            tags = header_tags(read_header(data), rules.tag_keywords())
        except Retry as exc:
            subjects[path] = Subject(None, None, {}, error=f"{NotDicom.type}: {exc}")
            continue
        tags_by_file[path] = tags
        if projection_radiograph(tags)[0]:
            to_classify.append((path, data))
        else:
            subjects[path] = Subject(UNROUTED, None, tags)
    version = None
    if to_classify:
        bundle = load_bundle(settings, model_uri)
        version = f"{bundle.name}/{bundle.version}"
        results, _ = bundle.predict_items(to_classify, max_pixels=settings.max_image_pixels)
        for (path, _), result in zip(to_classify, results, strict=True):
            tags = tags_by_file[path]
            if isinstance(result, DicomInputError):
                subjects[path] = Subject(None, None, tags, error=f"{result.type}: {result.reason}")
            else:
                subjects[path] = Subject(
                    result.label,
                    result.confidence,
                    tags,
                    novelty=result.novelty,
                    review_threshold=bundle.review_threshold,
                )
    records = []
    for path, _ in files:
        subject = subjects[path]
        decision = decide(rules, subject)
        records.append(
            {
                "file": path,
                "body_part": subject.body_part,
                "confidence": subject.confidence,
                "novelty": subject.novelty,
                "review_threshold": (
                    None
                    if subject.confidence is None
                    else rules.review.confidence_threshold(subject.review_threshold)
                ),
                "error": subject.error,
                "model": version if subject.confidence is not None else None,
                "rule": decision.rule,
                "routed_to": decision.routed_to,
                "destination": decision.destination,
                "rules": [{"rule": n, "matched": m, "why_not": w} for n, m, w in explain(rules, subject)],
            }
        )
    return records


def read_files(paths: list[Path]) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in paths]
