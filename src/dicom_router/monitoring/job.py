"""One drift run end to end: load REF and CUR, compare per group, write the report, the dashboard
snapshots and the MLflow copy, post the webhook. ``dicom-router drift``, the drift KFP component and the
schedules call ``drift_job``; it holds the wiring, ``drift.run_drift`` the logic.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from dicom_router.config import Settings
from dicom_router.durations import parse_duration
from dicom_router.errors import ModelNotFound
from dicom_router.monitoring.alerts import post_webhook
from dicom_router.monitoring.dashboard import log_report_to_mlflow, write_snapshots
from dicom_router.monitoring.drift import AlertRules, DriftInputError, DriftResult, run_drift
from dicom_router.monitoring.reference import load_frame, load_reference, load_window, reference_for_model
from dicom_router.report.render import REPORT_HTML, write_frame_report
from dicom_router.storage import write_uri

log = logging.getLogger(__name__)


def parse_window(text: str) -> timedelta:
    """``90m``, ``24h``, ``7d``, ``2w`` → a timedelta (the recent window CUR is cut to)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise DriftInputError(f"window {exc}") from None


@dataclass(frozen=True)
class DriftJob:
    """Everything one run needs; the CLI flags and the KFP component's parameters map onto it."""

    reference: str
    """``models:/…`` (the stored reference), a catalog/reference Parquet, or an inference-log prefix."""
    current: str
    """An inference-log prefix (usually) or a Parquet file."""
    by: tuple[str, ...] = ("site_id", "scanner_id")
    rules: AlertRules = field(default_factory=AlertRules)
    window: timedelta | None = None
    """Only CUR records newer than this (needs an ``at`` column)."""
    webhook: str | None = None
    """POST the document here when an alert fired."""
    workspace: Path | None = None
    """Evidently workspace for the dashboard; None writes no snapshots."""
    deployment: str = "default"
    report_uri: str | None = None
    """Where the HTML goes; default ``data_dir/drift/<time>.html``."""
    model_uri: str | None = None
    """Model version to log the report next to; default REF when it is ``models:/…``, else the model
    version most of CUR was routed with."""
    reference_catalog: str | None = None
    """When REF is ``models:/…`` without a stored reference: build it from this training catalog."""
    log_to_mlflow: bool = True
    """Log the report next to the model version (``model_uri``) in MLflow."""


def drift_job(settings: Settings, job: DriftJob, *, now: datetime | None = None) -> DriftResult:
    """Run one drift analysis with all its side effects; returns the result (``document()``,
    ``exit_code``)."""
    at = now or datetime.now(UTC)
    reference = _reference(settings, job)
    since = at - job.window if job.window else None
    window = load_window(job.current, settings, since=since)
    current = window.frame
    version = _version_of(settings, job.reference)
    other = 0
    if version is not None and "model_version" in current.columns:
        mine = current["model_version"] == version
        other = int((~mine).sum())
        current = current[mine].reset_index(drop=True)
        if other:
            log.info("drift of %s: %d records of other model versions left out", version, other)
    result = run_drift(reference, current, job.by, job.rules, at=at, tags=(job.deployment,))
    result.model_version, result.other_versions, result.lost_records = version, other, window.lost
    if window.lost:
        log.warning("drift: %d inference-log records of the window were lost", window.lost)
    html = result.render_html()
    report_uri = job.report_uri or str(settings.data_dir / "drift" / f"{at.strftime('%Y%m%dT%H%M%SZ')}.html")
    result.save_html(report_uri, settings, html=html)
    if job.webhook and result.alert:  # the alert first: a dashboard that is down must not delay it
        post_webhook(job.webhook, result.document())
    workspace = job.workspace
    if workspace is not None:
        _best_effort(
            "Evidently workspace", lambda: write_snapshots(workspace, result, deployment=job.deployment)
        )
    with tempfile.TemporaryDirectory() as tmp:
        traffic = Path(tmp)
        _best_effort(
            "the window's archive report",
            lambda: _window_report(settings, current, report_uri, result, traffic),
        )
        model_uri = job.model_uri or _model_of(job.reference, current)
        if job.log_to_mlflow and model_uri is not None:
            uri, attached = model_uri, traffic if result.window_report else None
            _best_effort("MLflow", lambda: log_report_to_mlflow(settings, uri, result, html, window=attached))
    return result


def _window_report(
    settings: Settings, current: pd.DataFrame, report_uri: str, result: DriftResult, out: Path
) -> None:
    """The archive report of the window's traffic, written to ``out`` and beside the drift report
    (``<report>.window/``): what the traffic was when drift was (or was not) found."""
    write_frame_report(current, settings, out, name=f"inference-log window up to {result.at:%Y-%m-%d %H:%M}Z")
    target = report_uri.removesuffix(".html") + ".window"
    for path in sorted(out.iterdir()):
        write_uri(f"{target}/{path.name}", path.read_bytes(), settings)
    result.window_report = f"{target}/{REPORT_HTML}"


def _best_effort(what: str, action: Callable[[], object]) -> None:
    """Dashboards are copies of the result: their failure is logged, the run (and its exit code) stands."""
    try:
        action()
    except ModelNotFound as exc:
        log.warning("drift report not kept in %s: %s", what, exc)
    except Exception:
        log.exception("drift report not kept in %s", what)


def _reference(settings: Settings, job: DriftJob) -> pd.DataFrame:
    if job.reference.startswith("models:/") and job.reference_catalog:
        try:
            return load_reference(settings, job.reference)
        except ModelNotFound:
            log.info("building the drift reference of %s from %s", job.reference, job.reference_catalog)
            return reference_for_model(settings, job.reference, job.reference_catalog)
    return load_frame(job.reference, settings)


def _version_of(settings: Settings, reference: str) -> str | None:
    """``name/version`` when REF is a model version's reference (its alias resolved now), else None."""
    if not reference.startswith("models:/"):
        return None
    from dicom_router.registry import model_version

    found = model_version(settings, reference)
    return f"{found.name}/{found.version}"


def _model_of(reference: str, current: pd.DataFrame) -> str | None:
    """REF when it names a model version, else CUR's most frequent ``model_version`` (``name/version``)."""
    if reference.startswith("models:/"):
        return reference
    if "model_version" not in current.columns or current["model_version"].dropna().empty:
        return None
    name, _, version = str(current["model_version"].mode().iloc[0]).partition("/")
    return f"models:/{name}/{version}" if version.isdigit() else None


def by_columns(values: Sequence[str]) -> tuple[str, ...]:
    """``--by`` values as given, or per site and per scanner when none is given."""
    return tuple(values) or ("site_id", "scanner_id")


def repeat(run: Callable[[], DriftResult], every: timedelta, stop: threading.Event) -> None:
    """The embedded schedule: run, log one line, wait ``every``; a failed run is logged and retried next
    time (e.g. no champion or no traffic yet), so the scheduler itself never dies of it."""
    while not stop.is_set():
        try:
            result = run()
            alerts = [g.name for g in result.groups if g.alert]
            log.info(
                "drift: %s (report %s)",
                f"ALERT {', '.join(alerts)}" if alerts else "no alert",
                result.report_html,
            )
        except Exception as exc:
            log.warning("drift run failed: %s", exc)
        stop.wait(every.total_seconds())
