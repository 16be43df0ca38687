"""Drift per group: one Evidently report per site, per scanner and overall, and the alert rules.

Evidently's own grouping compares each group of the current data with the whole reference; a hospital is
only comparable with itself, so every group here gets its own report over the matching reference rows. A
group value the reference never saw is a *new source*: it alerts at its first instance (no statistics
needed), is compared with the whole reference for information once it has enough instances, and is kept
out of the overall group so one new hospital does not make every known one look drifted.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from evidently import DataDefinition, Dataset, Report
from evidently.core.metric_types import render_widgets
from evidently.core.report import Snapshot
from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
from evidently.legacy.core import ColumnType
from evidently.legacy.renderers.html_widgets import group_widget, table_data, text_widget
from evidently.legacy.tests.base_test import TestStatus
from evidently.metrics import DriftedColumnsCount, MeanValue, RowCount, UniqueValueCount, ValueDrift
from evidently.presets import DataDriftPreset
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy.stats import chi2_contingency

from dicom_router.config import Settings
from dicom_router.monitoring.features import CATEGORICAL_COLUMNS, COLUMN_SETS, monitored_columns
from dicom_router.storage import write_uri

EXIT_ALERT = 3
"""The contract's exit code of ``drift`` when an alert fired."""
MISSING = "(missing)"
"""How an absent categorical value is tested (a header field that starts to be missing is drift)."""
DETAIL = ("alerts", "all")
"""Which groups get Evidently's full per-column report (distributions, the drift table) in the HTML and
the workspace: alerting ones only (default) or all. A full report of the 33 columns costs ~2.3 s here,
nearly all of it plotting; the compact one (each column's drift test, the drift share, instances,
prediction mix, mean confidence) ~1 s. A group that alerts in its compact run is run again in full, and
its verdict is read from that run, the one shown."""


SUMMARISED = ("pred_label", "confidence", "novelty")
"""Shown for every group whether tested or not: the prediction mix and the mean confidence and novelty
(the dashboard's panels)."""

CHI2_TWO_SAMPLE = "chi2_two_sample"
"""A categorical drift test registered with Evidently: chi-square on the 2 x k contingency table of
reference and current counts. Evidently's own ``chisquare`` is a goodness-of-fit test that takes the
reference counts as exact expectations, so a per-site reference of a few hundred instances makes every
large current window look drifted (measured: bench/drift.py); this one counts both samples' noise."""


def _chi2_two_sample(
    reference_data: pd.Series, current_data: pd.Series, _feature_type: ColumnType, threshold: float
) -> tuple[float, bool]:
    ref_counts = reference_data.value_counts()
    cur_counts = current_data.value_counts()
    keys = sorted(set(ref_counts.index) | set(cur_counts.index), key=str)
    if len(keys) < 2:
        return 1.0, False
    table = np.array([[ref_counts.get(k, 0) for k in keys], [cur_counts.get(k, 0) for k in keys]])
    p_value = float(chi2_contingency(table)[1])
    return p_value, p_value < threshold


register_stattest(
    StatTest(
        name=CHI2_TWO_SAMPLE,
        display_name="chi-square two-sample (contingency) p_value",
        allowed_feature_types=[ColumnType.Categorical],
        default_threshold=0.01,
    ),
    _chi2_two_sample,
)


class DriftInputError(ValueError):
    """REF, CUR or a ``--by`` column the caller named cannot be used (the CLI's usage error)."""


class AlertRules(BaseModel):
    """When a group alerts; a YAML file of these fields (``AlertRules.from_yaml``) or the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drift_share: float = Field(0.2, gt=0.0, le=1.0)
    """A group alerts when at least this share of its tested columns drifted (in-distribution windows
    stay at or below ~0.12, a changed detector or body-part mix reaches 0.3-0.6: bench/drift.py)."""
    min_samples: int = Field(30, ge=1)
    """Fewer current instances in a group: not tested (too few to tell drift from chance)."""
    min_reference: int = Field(20, ge=1)
    """Fewer reference instances of a known group: not tested (the reference cannot describe it)."""
    column_sets: tuple[str, ...] = ("metadata", "image", "prediction", "embedding")
    """Which column sets are tested and count towards the drift share (``features.COLUMN_SETS``)."""
    set_shares: dict[str, float] = Field(default_factory=lambda: {"image": 0.4})
    """A group also alerts when at least this share of one column set drifted: a change confined to one
    kind of column (a processing update moves the grey levels, nothing else) is diluted in the overall
    share. Image columns drift together under in-distribution sampling up to ~0.22 (bench/drift.py)."""
    critical_columns: tuple[str, ...] = ()
    """Columns whose drift alone alerts (e.g. ``pred_label``: the prediction mix moved)."""
    new_source_alert: bool = True
    """A site or scanner never seen in the reference alerts at its first instance."""
    overall_excludes_new_sources: bool = True
    """The overall group compares only known sources (new ones alert on their own)."""
    num_method: str | None = "ks"
    """Evidently stat test for numeric columns (two-sample Kolmogorov-Smirnov); None lets Evidently
    choose by reference size (K-S up to 1,000 rows, normed Wasserstein above: then ``threshold`` is a
    distance, not a p-value)."""
    cat_method: str | None = CHI2_TWO_SAMPLE
    """Evidently stat test for categorical columns (``CHI2_TWO_SAMPLE``); None: Evidently's choice."""
    threshold: float | None = 0.01
    """Per-column test threshold: a p-value for the default methods; None: each method's default."""

    @field_validator("column_sets")
    @classmethod
    def _known_sets(cls, sets: tuple[str, ...]) -> tuple[str, ...]:
        monitored_columns(sets)
        return sets

    @field_validator("set_shares")
    @classmethod
    def _known_set_shares(cls, shares: dict[str, float]) -> dict[str, float]:
        monitored_columns(list(shares))
        if not all(0.0 < v <= 1.0 for v in shares.values()):
            raise ValueError("set_shares values must be in (0, 1]")
        return shares

    @classmethod
    def from_yaml(cls, path: Path) -> AlertRules:
        """Rules from a YAML mapping of the fields above (missing fields keep their defaults)."""
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: alert rules must be a mapping of fields")
        return cls.model_validate(data)


@dataclass
class GroupResult:
    """One group's verdict; ``document()`` is its entry in the contract's ``groups`` list."""

    by: dict[str, str | None]
    n_reference: int
    n_current: int
    new_source: bool
    drift_share: float
    drifted_columns: list[str]
    alert: bool
    evaluated: bool
    """Whether the drift tests ran (enough instances on both sides)."""
    reason: str
    tested_columns: list[str] = field(default_factory=list)
    snapshot: Snapshot | None = field(default=None, repr=False)
    """The group's Evidently run (None only when the group had no current instance)."""

    @property
    def name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.by.items()) or "overall"

    def document(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "n_reference": self.n_reference,
            "n_current": self.n_current,
            "new_source": self.new_source,
            "drift_share": round(self.drift_share, 4),
            "drifted_columns": self.drifted_columns,
            "alert": self.alert,
            "evaluated": self.evaluated,
            "reason": self.reason,
        }


@dataclass
class DriftResult:
    groups: list[GroupResult]
    at: datetime
    rules: AlertRules
    report_html: str | None = None
    """Where ``save_html`` wrote the report of every group (path or URI)."""
    model_version: str | None = None
    """The model version (``name/version``) whose records CUR was cut to (REF is that version's)."""
    other_versions: int = 0
    """CUR records of other model versions, left out (a promotion is not drift)."""
    lost_records: int = 0
    """Inference-log records of the window that were lost (queues full, storage away, unreadable
    instance): CUR describes the traffic less this many instances."""
    window_report: str | None = None
    """Where the archive report of CUR (``report``: acquisition, population, header quality of the
    window's traffic) went, beside the drift report."""

    @property
    def alert(self) -> bool:
        return any(g.alert for g in self.groups)

    def document(self) -> dict[str, Any]:
        """The contract's ``drift`` JSON (plus ``at``); the webhook receives the same."""
        return {
            "alert": self.alert,
            "groups": [g.document() for g in self.groups],
            "report_html": self.report_html,
            "at": self.at.isoformat(timespec="seconds"),
            "model_version": self.model_version,
            "other_versions": self.other_versions,
            "lost_records": self.lost_records,
            "window_report": self.window_report,
        }

    def render_html(self) -> str:
        """One self-contained HTML page: a summary table, then every group's Evidently report."""
        rows = [
            [g.name, g.n_reference, g.n_current, g.new_source, f"{g.drift_share:.2f}", g.alert, g.reason]
            for g in self.groups
        ]
        widgets = [
            text_widget(
                title="dicom-router drift",
                text=f"Run at {self.at.isoformat(timespec='seconds')}: "
                + ("**alert**" if self.alert else "no alert")
                + (f". Model version {self.model_version}" if self.model_version else "")
                + (
                    f" ({self.other_versions} records of other versions left out)"
                    if self.other_versions
                    else ""
                )
                + f". Inference-log records lost in this window: {self.lost_records}"
                + f". Rules: `{self.rules.model_dump_json()}`",
            ),
            table_data(
                title="Groups",
                column_names=[
                    "group",
                    "n_reference",
                    "n_current",
                    "new_source",
                    "drift_share",
                    "alert",
                    "reason",
                ],
                data=rows,
            ),
        ]
        for g in self.groups:
            if g.snapshot is not None:
                model = g.snapshot.to_snapshot_model()
                widgets.append(group_widget(title=g.name, widgets=[*model.widgets, *model.tests_widgets]))
        return str(render_widgets(widgets, as_iframe=False))

    def save_html(self, uri: str, settings: Settings, *, html: str | None = None) -> str:
        """Write the report (``html``, else ``render_html()``) to ``uri`` (local path or ``s3://``) and
        remember it as ``report_html``."""
        write_uri(uri, (html if html is not None else self.render_html()).encode(), settings)
        self.report_html = uri
        return uri


def exit_code(result: DriftResult) -> int:
    """The contract's exit code of ``drift``: 3 when any group alerted, else 0."""
    return EXIT_ALERT if result.alert else 0


def _key(value: Any) -> str | None:
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def _prepared(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The columns Evidently sees: categories as strings (missing → ``MISSING``), the rest as floats."""
    out = pd.DataFrame(index=frame.index)
    for column in columns:
        if column in CATEGORICAL_COLUMNS:
            out[column] = frame[column].map(lambda v: MISSING if _key(v) is None else str(v)).astype(object)
        else:
            out[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return out


def run_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    by: Sequence[str],
    rules: AlertRules,
    *,
    at: datetime | None = None,
    tags: Sequence[str] = (),
    detail: str = "alerts",
) -> DriftResult:
    """Compare ``current`` with ``reference`` overall and per value of each ``by`` column.

    Groups come in order: overall (``by: {}``), then each ``by`` column's values (sorted, missing last).
    Only values present in ``current`` make groups. ``tags`` are added to every group's snapshot;
    ``detail`` is one of ``DETAIL``.
    """
    if detail not in DETAIL:
        raise ValueError(f"detail must be one of {DETAIL}, got {detail!r}")
    when = at or datetime.now(UTC)
    for column in by:
        for name, frame in (("reference", reference), ("current", current)):
            if column not in frame.columns:
                raise DriftInputError(f"--by {column}: the {name} has no such column")
    candidates = monitored_columns(rules.column_sets)
    columns = [c for c in candidates if c in reference.columns and c in current.columns]
    extras = [c for c in SUMMARISED if c in current.columns and c not in columns]
    ref = _prepared(reference, columns + [c for c in extras if c in reference.columns])
    cur = _prepared(current, columns + extras)
    ref_keys = {c: _group_keys(reference[c]) for c in by}
    cur_keys = {c: _group_keys(current[c]) for c in by}
    known = {c: set(ref_keys[c]) for c in by}
    is_new = pd.Series(False, index=current.index)
    for c in by:
        is_new |= ~cur_keys[c].isin(known[c])
    overall = cur[~is_new] if rules.overall_excludes_new_sources else cur
    context = _Context(columns, rules, when, tuple(tags), detail)
    groups = [context.evaluate({}, ref, overall, new_source=False)]
    for c in by:
        for value in sorted(set(cur_keys[c]), key=lambda v: (v == _NO_VALUE, v)):
            new = value not in known[c]
            ref_part = ref if new else ref[ref_keys[c] == value]
            by_value = {c: None if value == _NO_VALUE else value}
            groups.append(context.evaluate(by_value, ref_part, cur[cur_keys[c] == value], new_source=new))
    return DriftResult(groups, when, rules)


_NO_VALUE = "\x00none"
"""Group key of a missing ``by`` value (an instance without InstitutionName/StationName), reported as null."""


def _group_keys(values: pd.Series) -> pd.Series:
    """A ``by`` column as comparable strings; missing values share the ``_NO_VALUE`` group."""
    return values.map(lambda v: _key(v) or _NO_VALUE).astype(object)


@dataclass(frozen=True)
class _Context:
    columns: list[str]
    rules: AlertRules
    at: datetime
    tags: tuple[str, ...]
    detail: str

    def evaluate(
        self, by: dict[str, str | None], ref: pd.DataFrame, cur: pd.DataFrame, *, new_source: bool
    ) -> GroupResult:
        """The group's verdict, read from the Evidently run that the HTML and the dashboard show."""
        rules = self.rules
        tested = [c for c in self.columns if cur[c].notna().any() and ref[c].notna().any()]
        enough = len(cur) >= rules.min_samples and len(ref) >= rules.min_reference and bool(tested)
        tested = tested if enough else []
        snapshot = None
        verdict = _Verdict.of([], tested, new_source, rules)
        if len(cur):
            detailed = self.detail == "all"
            snapshot = self._report(by, ref if enough else None, cur, tested, new_source, detailed)
            verdict = _Verdict.of(drifted_columns(snapshot, tested), tested, new_source, rules)
            if verdict.alert and not detailed:  # an alerting group is shown with every column's report
                snapshot = self._report(by, ref, cur, tested, new_source, True)
                verdict = _Verdict.of(drifted_columns(snapshot, tested), tested, new_source, rules)
        return GroupResult(
            by=by,
            n_reference=0 if new_source else len(ref),
            n_current=len(cur),
            new_source=new_source,
            drift_share=verdict.share,
            drifted_columns=verdict.drifted,
            alert=verdict.alert,
            evaluated=enough,
            reason=_reason(new_source, enough, verdict, tested, len(cur), len(ref), rules),
            tested_columns=tested,
            snapshot=snapshot,
        )

    def _report(
        self,
        by: dict[str, str | None],
        ref: pd.DataFrame | None,
        cur: pd.DataFrame,
        tested: list[str],
        new_source: bool,
        detailed: bool,
    ) -> Snapshot:
        """The group's one Evidently run: every tested column's drift test (``ValueDrift``, its verdict
        is the alert's input) with the drift share, plus instances, prediction mix and mean confidence
        and novelty (what the dashboard's panels plot). ``detailed`` runs the drift preset: the same
        tests with their distributions and the drift table."""
        rules = self.rules
        metrics: list[Any] = []
        if ref is not None and tested:
            drift_args: dict[str, Any] = {
                "columns": tested,
                "drift_share": rules.drift_share,
                "num_method": rules.num_method,
                "cat_method": rules.cat_method,
                "threshold": rules.threshold,
            }
            if detailed:
                metrics.append(DataDriftPreset(**drift_args))
            else:
                metrics.append(DriftedColumnsCount(**drift_args))
                metrics.extend(
                    ValueDrift(
                        column=c,
                        method=rules.cat_method if c in CATEGORICAL_COLUMNS else rules.num_method,
                        threshold=rules.threshold,
                    )
                    for c in tested
                )
        metrics.append(RowCount())
        if "pred_label" in cur.columns:
            metrics.append(UniqueValueCount(column="pred_label"))
        compared = ref if tested else None
        summarised = [
            c
            for c in SUMMARISED
            if c in cur.columns and cur[c].notna().any() and (compared is None or c in compared.columns)
        ]
        metrics.extend(MeanValue(column=c) for c in summarised if c != "pred_label")
        shown = [c for c in cur.columns if c in tested or c in summarised]
        definition = DataDefinition(
            numerical_columns=[c for c in shown if c not in CATEGORICAL_COLUMNS],
            categorical_columns=[c for c in shown if c in CATEGORICAL_COLUMNS],
        )
        current_data = Dataset.from_pandas(cur[shown].reset_index(drop=True), data_definition=definition)
        reference_data = None
        if compared is not None:
            reference_data = Dataset.from_pandas(
                compared[shown].reset_index(drop=True), data_definition=definition
            )
        labels = _labels(by, new_source)
        tags = [*self.tags, "drift", labels["grouping"], *(["new_source"] if new_source else [])]
        with _quiet():
            return Report(metrics, include_tests=True).run(
                current_data,
                reference_data,
                timestamp=self.at.astimezone(UTC).replace(tzinfo=None),
                metadata=dict(labels),
                tags=tags,
                name=labels["group"],
            )


def drifted_columns(snapshot: Snapshot, tested: Sequence[str]) -> list[str]:
    """The columns whose drift test failed in ``snapshot`` (its ``ValueDrift`` results), in ``tested``
    order. A tested column without a result is an error: the verdict must come from this run."""
    verdicts: dict[str, bool] = {}
    for result in snapshot.metric_results.values():
        for test in result.tests:
            params = test.metric_config.params
            if params.get("type") == _VALUE_DRIFT:
                verdicts[str(params["column"])] = test.status == TestStatus.FAIL
    missing = [c for c in tested if c not in verdicts]
    if missing:
        raise RuntimeError(f"the Evidently run has no drift test of {', '.join(missing)}")
    return [c for c in tested if verdicts[c]]


_VALUE_DRIFT = "evidently:metric_v2:ValueDrift"


@dataclass(frozen=True)
class _Verdict:
    drifted: list[str]
    share: float
    critical: list[str]
    sets: dict[str, float]
    alert: bool

    @classmethod
    def of(cls, drifted: list[str], tested: list[str], new_source: bool, rules: AlertRules) -> _Verdict:
        """The alert rules applied to one group's drifted columns (``tested`` empty: not evaluated)."""
        share = len(drifted) / len(tested) if tested else 0.0
        critical = sorted(set(drifted) & set(rules.critical_columns))
        sets = _set_shares(drifted, tested, rules)
        alert = (new_source and rules.new_source_alert) or (
            bool(tested) and (share >= rules.drift_share or bool(critical) or bool(sets))
        )
        return cls(drifted, share, critical, sets, alert)


@contextmanager
def _quiet() -> Iterator[None]:
    """Constant columns (one scanner's bit depth, spacing) make Evidently's correlations divide by zero;
    the tests handle them, the warnings are noise."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _set_shares(drifted: list[str], tested: list[str], rules: AlertRules) -> dict[str, float]:
    """The column sets whose drifted share reached their ``set_shares`` threshold, with that share."""
    reached = {}
    for name, threshold in rules.set_shares.items():
        members = [c for c in tested if c in COLUMN_SETS[name]]
        if members:
            share = sum(c in drifted for c in members) / len(members)
            if share >= threshold:
                reached[name] = share
    return reached


def _reason(
    new_source: bool,
    enough: bool,
    verdict: _Verdict,
    tested: list[str],
    n_cur: int,
    n_ref: int,
    rules: AlertRules,
) -> str:
    parts = []
    if new_source:
        parts.append(
            "new source: never seen in the reference" + (" (compared with all of it)" if enough else "")
        )
    if not enough:
        if n_cur < rules.min_samples:
            parts.append(f"{n_cur} current instance(s) < min_samples {rules.min_samples}: not tested")
        elif n_ref < rules.min_reference:
            parts.append(f"{n_ref} reference instance(s) < min_reference {rules.min_reference}: not tested")
        else:
            parts.append("no column to test")
    else:
        compared = ">=" if verdict.share >= rules.drift_share else "<"
        parts.append(
            f"{len(verdict.drifted)} of {len(tested)} columns drifted "
            f"(share {verdict.share:.2f} {compared} {rules.drift_share:.2f})"
        )
        if verdict.critical:
            parts.append(f"critical column(s) drifted: {', '.join(verdict.critical)}")
        for name, set_share in verdict.sets.items():
            parts.append(f"{name} columns: share {set_share:.2f} >= {rules.set_shares[name]:.2f}")
    return "; ".join(parts)


def _labels(by: dict[str, str | None], new_source: bool) -> dict[str, str]:
    """Snapshot metadata the dashboard's panels filter on (Evidently wants string values)."""
    return {
        "group": ", ".join(f"{k}={v}" for k, v in by.items()) or "overall",
        "grouping": ",".join(by) or "overall",
        "new_source": str(new_source).lower(),
        **{k: v if v is not None else MISSING for k, v in by.items()},
    }
