"""Champion versus challenger on live traffic: what ``dicom-router compare`` reports.

The inference log holds both answers for every instance routed while a model was in shadow; the
routing queue's corrections hold what reviewers said those instances were. Per site and scanner (and
overall): how often the two models agree, and how often each was right on the reviewed instances, with
bootstrap intervals; and the instances they disagree on, as a page a reviewer can label from
(thumbnails decoded from the DICOM in Orthanc, never from a rendered copy of it). Pseudonyms only.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from PIL import Image

from dicom_router import LABELS
from dicom_router.dicom.decode import decode_bytes
from dicom_router.dicom.errors import DicomInputError
from dicom_router.evaluate import percentile_interval
from dicom_router.inference import letterbox

GROUPS = ("site_id", "scanner_id")
THUMBNAIL_PX = 160
MAX_THUMBNAILS = 200
"""A page of disagreements stays quick to open; the JSON lists them all."""


def mean_ci(
    values: npt.ArrayLike, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a mean (a rate of 0/1 outcomes); None for no values."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, array.size, size=(resamples, array.size))].mean(axis=1)
    return percentile_interval(means, confidence)


def _rate(outcomes: pd.Series) -> dict[str, Any]:
    values = outcomes.astype(float).to_numpy()
    return {
        "rate": float(values.mean()) if values.size else None,
        "ci": mean_ci(values),
    }


def summary(frame: pd.DataFrame) -> dict[str, Any]:
    """Agreement and reviewed accuracy of one group (``frame``: shadowed records with ``reviewed``)."""
    reviewed = frame[frame["reviewed"].notna()]
    agreement = _rate(frame["pred_label"] == frame["shadow_label"])
    champion = _rate(reviewed["pred_label"] == reviewed["reviewed"])
    challenger = _rate(reviewed["shadow_label"] == reviewed["reviewed"])
    return {
        "n": len(frame),
        "agreement": agreement["rate"],
        "agreement_ci": agreement["ci"],
        "reviewed": len(reviewed),
        "champion_accuracy": champion["rate"],
        "champion_accuracy_ci": champion["ci"],
        "challenger_accuracy": challenger["rate"],
        "challenger_accuracy_ci": challenger["ci"],
    }


def compare(records: pd.DataFrame, reviewed: dict[str, str], since: datetime | None) -> dict[str, Any]:
    """The ``compare --json`` document: inference-log ``records`` (those with a shadow answer count)
    and ``reviewed`` labels by SOP hash."""
    shadowed = records[records["shadow_label"].notna()].copy()
    shadowed = shadowed.drop_duplicates("sop_uid_hash", keep="last")  # a re-routed instance counts once
    shadowed["reviewed"] = shadowed["sop_uid_hash"].map(reviewed)
    groups = []
    for keys, group in shadowed.groupby(list(GROUPS), dropna=False, sort=True):
        by = {name: _text(value) for name, value in zip(GROUPS, keys, strict=True)}
        groups.append({"by": by, **summary(group)})
    differing = shadowed[shadowed["pred_label"] != shadowed["shadow_label"]]
    disagreements = [
        {
            "sop_hash": str(row["sop_uid_hash"]),
            "site_id": _text(row["site_id"]),
            "scanner_id": _text(row["scanner_id"]),
            "champion": str(row["pred_label"]),
            "champion_confidence": float(row["confidence"]),
            "challenger": str(row["shadow_label"]),
            "challenger_confidence": float(row["shadow_confidence"]),
            "reviewed": _text(row["reviewed"]),
        }
        for row in differing.to_dict("records")
    ]
    return {
        "since": None if since is None else since.isoformat(),
        "champion_versions": sorted(set(shadowed["model_version"].dropna())),
        "challenger_versions": sorted(set(shadowed["shadow_version"].dropna())),
        "overall": summary(shadowed),
        "groups": groups,
        "disagreements": disagreements,
    }


def _text(value: object) -> str | None:
    """A frame's value as text; None for a missing one (NaN, None)."""
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def thumbnail(data: bytes, max_pixels: int) -> str | None:
    """A small PNG (base64) of the decoded image for the reviewer's page; None when it cannot decode."""
    try:
        pixels = decode_bytes(data, "thumbnail", max_pixels=max_pixels).pixels
    except DicomInputError:
        return None
    small = letterbox(pixels, THUMBNAIL_PX)
    buffer = io.BytesIO()
    Image.fromarray((np.clip(small, 0.0, 1.0) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pct(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")


def render_html(document: dict[str, Any], fetch: Callable[[str], bytes | None], max_pixels: int) -> str:
    """The comparison as one self-contained page: the table per site and scanner, then each disagreement
    with its thumbnail (``fetch``: DICOM bytes by SOP hash, None when not in the archive; decoded within
    ``max_pixels``) and the command that labels it."""
    head = (
        "<th>site</th><th>scanner</th><th>n</th><th>agreement</th><th>reviewed</th>"
        "<th>champion accuracy</th><th>challenger accuracy</th>"
    )
    rows = []
    for group in [
        {"by": {"site_id": "all", "scanner_id": "all"}, **document["overall"]},
        *document["groups"],
    ]:
        cells = [
            html.escape(str(group["by"]["site_id"])),
            html.escape(str(group["by"]["scanner_id"])),
            str(group["n"]),
            _pct(group["agreement"], group["agreement_ci"]),
            str(group["reviewed"]),
            _pct(group["champion_accuracy"], group["champion_accuracy_ci"]),
            _pct(group["challenger_accuracy"], group["challenger_accuracy_ci"]),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    cards = []
    for item in document["disagreements"][:MAX_THUMBNAILS]:
        data = fetch(item["sop_hash"])
        picture = thumbnail(data, max_pixels) if data is not None else None
        image = (
            f'<img alt="instance" src="data:image/png;base64,{picture}">'
            if picture
            else "<p>(not in the archive)</p>"
        )
        sop = html.escape(item["sop_hash"])
        reviewed = f"<p>reviewed: <b>{html.escape(item['reviewed'])}</b></p>" if item["reviewed"] else ""
        cards.append(
            f'<div class="card">{image}<p>champion <b>{html.escape(item["champion"])}</b> '
            f"({item['champion_confidence']:.2f}) · challenger <b>{html.escape(item['challenger'])}</b> "
            f"({item['challenger_confidence']:.2f})</p>{reviewed}"
            f"<p><code>dicom-router review label {sop} LABEL</code></p></div>"
        )
    versions = (
        f"champion {', '.join(document['champion_versions']) or '–'} · challenger "
        f"{', '.join(document['challenger_versions']) or '–'} · since {document['since'] or 'the start'}"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Champion vs challenger</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
.card{{display:inline-block;width:220px;margin:6px;vertical-align:top;font-size:12px}}
.card img{{width:{THUMBNAIL_PX}px;background:#000}}</style></head><body>
<h1>Champion vs challenger on live traffic</h1><p>{html.escape(versions)}</p>
<table><tr>{head}</tr>{"".join(rows)}</table>
<p>Labels: {", ".join(LABELS)}. POST /review/SOP_HASH/label on the router does the same.</p>
<h2>Where they disagree ({len(document["disagreements"])})</h2>{"".join(cards)}</body></html>
"""


def write_report(
    document: dict[str, Any], fetch: Callable[[str], bytes | None], out: Path, *, max_pixels: int
) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(document, fetch, max_pixels))
    return out
