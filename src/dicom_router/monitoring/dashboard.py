"""The drift dashboard: snapshots in a local Evidently workspace served by the Evidently UI, and the
latest report beside the model version in MLflow.

One Evidently project per deployment; its dashboard has an overview tab and one tab per site (drift
share, instances from new sources, prediction mix, mean confidence over time). Panels filter snapshots
by the metadata ``run_drift`` puts on each group's snapshot (``grouping``, ``site_id``, ``new_source``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from evidently.sdk.models import DashboardModel, DashboardPanelPlot, DashboardTabModel, PanelMetric
from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel
from evidently.ui.workspace import Project, Workspace

from dicom_router.config import Settings
from dicom_router.monitoring.drift import DriftResult
from dicom_router.registry import connect, model_version

UI_HOST = "127.0.0.1"
UI_ENV = {"DO_NOT_TRACK": "1"}
"""Environment of the UI process: no usage telemetry leaves the machine."""
UI_READY_PATH = "/api/version"
OVERVIEW_TAB = "Overview"
MLFLOW_DIR = "drift"


def evidently_ui_argv(workspace: Path, port: int, host: str = UI_HOST) -> list[str]:
    """The command line of the Evidently UI over ``workspace`` (run it with ``UI_ENV``)."""
    exe = Path(sys.executable).parent / "evidently"
    return [
        str(exe) if exe.is_file() else "evidently",
        "ui",
        "--workspace",
        str(workspace),
        "--host",
        host,
        "--port",
        str(port),
    ]


def project_name(deployment: str) -> str:
    return f"dicom-router drift · {deployment}"


def ensure_project(workspace: Workspace, deployment: str) -> Project:
    """The deployment's project, created (with its overview tab) on first use."""
    name = project_name(deployment)
    found = workspace.search_project(name)
    if found:
        project: Project = found[0]
        return project
    project = workspace.create_project(name, description=f"Drift per site and scanner of {deployment}")
    _add_tab(workspace, project, OVERVIEW_TAB, overview_panels())
    return project


def _metric(
    metric: str,
    legend: str,
    *,
    labels: dict[str, str] | None = None,
    tags: list[str] | None = None,
    metadata: dict[str, str] | None = None,
) -> PanelMetric:
    return PanelMetric(
        legend=legend, metric=metric, metric_labels=labels or {}, tags=tags or [], metadata=metadata or {}
    )


def _panels_for(metadata: dict[str, str], what: str) -> list[DashboardPanelPlot]:
    """Drift share, new-source instances, prediction mix, mean confidence and mean novelty for one slice
    of snapshots."""
    return [
        line_plot_panel(
            title=f"Drift share — {what}",
            values=[
                _metric(
                    "DriftedColumnsCount",
                    "share of drifted columns",
                    labels={"value_type": "share"},
                    metadata=metadata,
                )
            ],
            size="half",
        ),
        counter_panel(
            title=f"Instances from new sources — {what}",
            values=[_metric("RowCount", "instances", tags=["new_source"], metadata=metadata)],
            size="half",
            aggregation="sum",
        ),
        bar_plot_panel(
            title=f"Prediction mix — {what}",
            values=[
                _metric("UniqueValueCount", "{{label}}", labels={"value_type": "share"}, metadata=metadata)
            ],
            size="half",
            stacked=True,
        ),
        line_plot_panel(
            title=f"Mean confidence — {what}",
            values=[_metric("MeanValue", "confidence", labels={"column": "confidence"}, metadata=metadata)],
            size="half",
        ),
        line_plot_panel(  # 1.0: the 95th percentile of held-out images; a new hospital's views move it
            title=f"Mean novelty — {what}",
            values=[_metric("MeanValue", "novelty", labels={"column": "novelty"}, metadata=metadata)],
            size="half",
        ),
    ]


def overview_panels() -> list[DashboardPanelPlot]:
    """Known sources together (the overall group), plus new-source instances of every site."""
    panels = _panels_for({"grouping": "overall"}, "overall (known sources)")
    panels[1] = counter_panel(
        title="Instances from new sites",
        values=[_metric("RowCount", "instances", tags=["new_source"], metadata={"grouping": "site_id"})],
        size="half",
        aggregation="sum",
    )
    return panels


def site_tab(site: str) -> str:
    return f"site {site}"


def _add_tab(workspace: Workspace, project: Project, title: str, panels: list[DashboardPanelPlot]) -> None:
    """Append a tab with its panels in one write (Evidently's ``add_panel`` lists a panel twice when the
    tab already exists)."""
    dashboard: DashboardModel = workspace.get_dashboard(project.id)
    if any(tab.title == title for tab in dashboard.tabs):
        return
    dashboard.panels.extend(panels)
    dashboard.tabs.append(DashboardTabModel(title=title, panels=[p.id for p in panels]))
    workspace.save_dashboard(project.id, dashboard)


def write_snapshots(workspace_dir: Path, result: DriftResult, *, deployment: str = "default") -> list[str]:
    """Add every group's snapshot to the deployment's project (a tab per site on first sight); returns
    the snapshot ids. The UI picks new snapshots up while it runs (it watches the folder)."""
    workspace_dir.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(workspace_dir))
    project = ensure_project(workspace, deployment)
    for group in result.groups:
        site = group.by.get("site_id", "")
        if "site_id" in group.by and site is not None:
            _add_tab(
                workspace,
                project,
                site_tab(site),
                _panels_for({"site_id": site, "grouping": "site_id"}, site),
            )
    return [
        str(workspace.add_run(project.id, group.snapshot).id)
        for group in result.groups
        if group.snapshot is not None
    ]


def log_report_to_mlflow(
    settings: Settings, model_uri: str, result: DriftResult, html: str, *, window: Path | None = None
) -> str:
    """Put the latest report (HTML + JSON document) in the model version's run as ``drift/latest.*``
    (and ``window``, the archive report of the window's traffic, as ``drift/window/``) and tag the
    version with the verdict; returns the artifact URI of the HTML."""
    version = model_version(settings, model_uri)
    if version.run_id is None:
        raise ValueError(f"{model_uri} has no run to log the drift report to")
    client = connect(settings)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "latest.html").write_text(html, encoding="utf-8")
        (Path(tmp) / "latest.json").write_text(json.dumps(result.document(), indent=2, default=str))
        client.log_artifacts(version.run_id, tmp, MLFLOW_DIR)
    if window is not None:
        client.log_artifacts(version.run_id, str(window), f"{MLFLOW_DIR}/window")
    uri = f"runs:/{version.run_id}/{MLFLOW_DIR}/latest.html"
    tags = {
        "drift.alert": str(result.alert).lower(),
        "drift.at": result.at.isoformat(timespec="seconds"),
        "drift.report": uri,
        "drift.alerting_groups": json.dumps([g.by for g in result.groups if g.alert])[:5000],
    }
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    return uri
