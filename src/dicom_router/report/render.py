"""The archive report as a person reads it: one self-contained HTML page (plots embedded), the same
plots as PNG files beside it, and the JSON document.

Everything shown comes from the figures document: counts, quantiles and pseudonyms. Long tables are cut
to their largest rows on the page (the JSON keeps them all).
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dicom_router.config import Settings
from dicom_router.report.figures import BODY_PART_GROUPS, archive_report, findings, open_archive

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_ROWS = 40
"""Rows of a table on the page; the JSON holds every row."""
MAX_BARS = 15
"""Groups (sites, scanners) drawn in a plot: the largest ones."""
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"


def _short(value: Any) -> str:
    """A pseudonym shortened for axis labels (8 hex digits still tell a fleet's scanners apart)."""
    text = "(none)" if value is None else str(value)
    return text[:8]


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no pyplot state

    return Figure(figsize=(width, height), layout="constrained")


def _stacked(ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str) -> None:
    bottom = [0.0] * len(groups)
    for name, values in series.items():
        ax.barh(groups, values, left=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.invert_yaxis()
    ax.set_title(title, fontsize="medium")
    if series:
        ax.legend(fontsize="x-small", loc="lower right")


def _pivot(
    rows: Sequence[Mapping[str, Any]], key: str, order: Sequence[str] | None = None
) -> tuple[list[str], dict[str, list[float]]]:
    """Rows ``{site_id, key, n}`` → the largest sites and one series per ``key`` value."""
    totals: defaultdict[str, float] = defaultdict(float)
    cells: defaultdict[tuple[str, str], float] = defaultdict(float)
    for row in rows:
        site = _short(row["site_id"])
        totals[site] += row["n"]
        cells[(site, str(row[key]))] += row["n"]
    sites = sorted(totals, key=lambda s: -totals[s])[:MAX_BARS]
    names = list(order) if order else sorted({str(r[key]) for r in rows})
    series = {
        name: [cells[(s, name)] for s in sites] for name in names if any(cells[(s, name)] for s in sites)
    }
    return sites, series


def plot_hierarchy(document: Mapping[str, Any]) -> Figure:
    groups = document["hierarchy"]["groups"][:MAX_BARS]
    fig = _new_figure(11, 4.5)
    left, right = fig.subplots(1, 2, width_ratios=[1.4, 1])
    names = [" / ".join(_short(g[c]) for c in document["by"]) for g in groups]
    left.barh(names, [g["instances"] for g in groups], label="instances")
    if groups and groups[0]["studies"] is not None:
        left.barh(names, [g["studies"] for g in groups], height=0.4, label="studies")
    left.invert_yaxis()
    left.set_title(f"instances per {' / '.join(document['by'])} (largest {len(groups)})", fontsize="medium")
    left.legend(fontsize="x-small")
    histograms = {
        level: document["hierarchy"].get(f"instances_per_{level}", {}).get("histogram", [])
        for level in ("study", "series")
    }
    for (level, histogram), style in zip(histograms.items(), ("-o", "-s"), strict=True):
        if histogram:
            right.plot([h["size"] for h in histogram], [h["n"] for h in histogram], style, label=level)
    right.set_yscale("log")
    right.set_xlabel("instances")
    right.set_ylabel("studies / series")
    right.set_title("instances per study and per series", fontsize="medium")
    if any(histograms.values()):
        right.legend(fontsize="x-small")
    return fig


def plot_population(document: Mapping[str, Any]) -> Figure | None:
    population = document["population"]
    if "skipped" in population:
        return None
    fig = _new_figure(11, 4.5)
    left, right = fig.subplots(1, 2)
    _stacked(left, *_pivot(population["sex"], "sex"), title=f"{population['sex_counts']} by sex, per site")
    _stacked(
        right,
        *_pivot(population["age"], "band", population["age_bands"]),
        title=f"{population['age_counts']} by age band (years), per site",
    )
    return fig


def plot_labels(document: Mapping[str, Any]) -> Figure | None:
    labels = document["labels"]
    panels = [name for name in ("labelled", "predicted") if labels.get(name)]
    if not panels:
        return None
    fig = _new_figure(5.5 * len(panels), 4.5)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, name in zip(axes, panels, strict=True):
        _stacked(ax, *_pivot(labels[name], "label", labels["vocabulary"]), title=f"{name}, per site")
    return fig


def plot_acquisition(document: Mapping[str, Any]) -> Figure | None:
    """Box plots of kVp, exposure and pixel spacing per scanner (whiskers p5–p95); red: a scanner whose
    median stands apart from the fleet's."""
    acquisition = document["acquisition"]
    if "skipped" in acquisition:
        return None
    flagged = {(f["scanner_id"], f["column"]) for f in acquisition["flags"] if "robust_z" in f}
    columns = [
        c
        for c in ("kvp", "exposure", "pixel_spacing")
        if any(r["column"] == c and r["p50"] is not None for r in acquisition["numeric"])
    ]
    if not columns:
        return None
    fig = _new_figure(4.2 * len(columns), 4.8)
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for ax, column in zip(axes, columns, strict=True):
        rows = [r for r in acquisition["numeric"] if r["column"] == column and r["p50"] is not None]
        rows = sorted(rows, key=lambda r: -r["n"])[:MAX_BARS]
        stats = [
            {
                "label": _short(r["scanner_id"]),
                "whislo": r["p5"],
                "q1": r["p25"],
                "med": r["p50"],
                "q3": r["p75"],
                "whishi": r["p95"],
                "fliers": [],
            }
            for r in rows
        ]
        boxes = ax.bxp(stats, orientation="horizontal", patch_artist=True, showfliers=False)
        for box, r in zip(boxes["boxes"], rows, strict=True):
            box.set_facecolor("tab:red" if (r["scanner_id"], column) in flagged else "tab:blue")
            box.set_alpha(0.6)
        ax.invert_yaxis()
        ax.set_title(column, fontsize="medium")
    fig.suptitle("acquisition per scanner (p5–p95; red: median apart from the fleet)", fontsize="medium")
    return fig


def plot_phi(document: Mapping[str, Any]) -> Figure | None:
    tags = document["deidentification"].get("tags", [])
    if not tags:
        return None
    fig = _new_figure(8, 0.6 + 0.28 * len(tags))
    ax = fig.add_subplot()
    colours = {"dropped": "tab:green", "pseudonymised": "tab:blue", "coarsened": "tab:orange"}
    ax.barh(
        [t["tag"] for t in tags],
        [t["objects"] for t in tags],
        color=[colours.get(t["catalog"].split(" ")[0], "tab:red") for t in tags],
    )
    ax.invert_yaxis()
    ax.set_xlabel("source objects carrying it")
    ax.set_title(
        "PHI-bearing elements in the source (green dropped, blue pseudonymised, orange coarsened, red: "
        "look at the pixels)",
        fontsize="small",
    )
    return fig


PLOTS: dict[str, Callable[[Mapping[str, Any]], Figure | None]] = {
    "hierarchy": plot_hierarchy,
    "population": plot_population,
    "labels": plot_labels,
    "acquisition": plot_acquisition,
    "deidentification": plot_phi,
}


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p>(none)</p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows[:MAX_ROWS]
    )
    more = f"<p>… {len(rows) - MAX_ROWS} more rows in {REPORT_JSON}</p>" if len(rows) > MAX_ROWS else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _categorical_rows(categorical: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per scanner: each column's most frequent value (``+ more`` when it has others)."""
    seen: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
    for column, rows in categorical.items():
        for row in rows:  # ordered by scanner, then count: the first value of a scanner is its mode
            seen[(str(row["scanner_id"]), column)].append(str(row["value"]))
    by_scanner: defaultdict[str, dict[str, Any]] = defaultdict(dict)
    for (scanner, column), values in seen.items():
        by_scanner[scanner][column] = values[0] + (" (+ more)" if len(values) > 1 else "")
    return [{"scanner_id": s, **cells} for s, cells in by_scanner.items()]


def render_html(document: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """The report page; ``images``: PNG bytes by section, embedded so the page stands alone."""

    def figure(name: str) -> str:
        if name not in images:
            return ""
        data = base64.b64encode(images[name]).decode("ascii")
        return f'<img alt="{name}" src="data:image/png;base64,{data}">'

    quality, audit, acquisition = document["quality"], document["deidentification"], document["acquisition"]
    notes = findings(document)
    totals = [{k: document[k] for k in ("instances", "studies", "series", "patients", "sites", "scanners")}]
    body_part = quality.get("body_part", {})
    comparisons = "".join(
        f"<h3>BodyPartExamined {name.replace('_', ' ')}</h3>{_table(body_part[name])}"
        for name in ("vs_predicted", "vs_label")
        if name in body_part
    )
    duplicates = [{"kind": k, **v} for k, v in quality.get("duplicates", {}).items()]
    sections = [
        "<h2>Findings</h2>"
        + (
            "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
            if notes
            else "<p>none</p>"
        ),
        f"<h2>Hierarchy</h2>{_table(totals)}{figure('hierarchy')}{_table(document['hierarchy']['groups'])}",
        f"<h2>Population</h2>{figure('population')}" + html.escape(document["population"].get("skipped", "")),
        f"<h2>Labels and the model's answers</h2>{figure('labels')}",
        "<h2>Acquisition</h2>"
        + figure("acquisition")
        + "<h3>Flags</h3>"
        + _table(acquisition.get("flags", []))
        + "<h3>Most frequent values per scanner</h3>"
        + _table(_categorical_rows(acquisition.get("categorical", {})))
        + "<h3>Distributions per scanner</h3>"
        + _table(acquisition.get("numeric", [])),
        "<h2>Quality and veracity</h2>"
        + "<h3>Missing required tags</h3>"
        + _table([{"tag": t, "instances": n} for t, n in quality.get("missing_required", {}).items()])
        + "<h3>Studies whose instances disagree</h3>"
        + _table([quality["inconsistent_studies"]] if "inconsistent_studies" in quality else [])
        + "<h3>Duplicates</h3>"
        + _table(duplicates)
        + "<h3>Unreadable objects by error type</h3>"
        + (
            _table([{"type": t, "objects": n} for t, n in quality["unreadable"].items()])
            if "unreadable" in quality
            else "<p>no ingest QA beside the catalog</p>"
        )
        + f"<p>BodyPartExamined is compared by group ({', '.join(BODY_PART_GROUPS)}) on "
        f"{body_part.get('with_header', 0)} instances that carry one: a finding about the archive, "
        "not an error.</p>" + comparisons,
        "<h2>De-identification audit</h2>"
        + f"<p>PHI-bearing elements of {audit.get('objects_audited', 0)} source objects (counts, never "
        "values), and what the catalog kept of each. "
        + html.escape(audit.get("skipped", ""))
        + "</p>"
        + figure("deidentification")
        + _table(audit.get("tags", []))
        + f"<h3>Checks: {'passed' if audit['passed'] else 'FAILED'}</h3>"
        + _table(audit["checks"]),
    ]
    title = f"Archive report: {document['catalog']}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}}img{{max-width:100%}}
h2{{border-bottom:2px solid #446;margin-top:1.6em}}</style></head><body>
<h1>{html.escape(title)}</h1><p>generated {html.escape(document["generated_at"])} · grouped by
{html.escape(", ".join(document["by"]))}</p>{"".join(sections)}</body></html>
"""


def write_report(document: Mapping[str, Any], out_dir: Path) -> Path:
    """``report.html``, ``report.json`` and one PNG per plot in ``out_dir``; the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    for name, plot in PLOTS.items():
        fig = plot(document)
        if fig is not None:
            path = out_dir / f"{name}.png"
            fig.savefig(path, format="png", dpi=100)
            images[name] = path.read_bytes()
    (out_dir / REPORT_JSON).write_text(json.dumps(document, indent=2))
    page = out_dir / REPORT_HTML
    page.write_text(render_html(document, images))
    return page


def summary(document: Mapping[str, Any]) -> list[str]:
    """The report in a few lines, for a terminal or a log: the counts, the audit's verdict, the findings."""
    counts = " · ".join(
        f"{document[k]} {k}"
        for k in ("instances", "studies", "series", "patients", "sites", "scanners")
        if document[k] is not None
    )
    audit = document["deidentification"]
    seen = len(audit.get("tags", []))
    verdict = "passed" if audit["passed"] else "FAILED"
    lines = [counts, f"de-identification audit {verdict}: {seen} PHI-bearing elements in the source, checked"]
    lines += [f"finding: {line}" for line in findings(document)]
    return lines


def write_frame_report(
    frame: pd.DataFrame, settings: Settings, out_dir: Path, *, name: str
) -> dict[str, Any]:
    """The report of rows already in memory (a training set, an inference-log window), computed exactly
    as ``report CATALOG`` would: the rows are written as a catalog file first, removed once read (its
    object keys are the raw zone's). ``name`` says what the rows are, in the page's title."""
    out_dir.mkdir(parents=True, exist_ok=True)
    catalog = out_dir / "rows.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), catalog)
    try:
        document = archive_report(open_archive(str(catalog), settings), settings)
    finally:
        catalog.unlink()
    document["catalog"] = name
    write_report(document, out_dir)
    return document
