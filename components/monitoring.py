# mypy: disable-error-code="import-untyped"
"""Monitoring components: the drift reference of a new version, and one drift analysis (calls the library)."""

# No `from __future__ import annotations`: KFP reads these annotations (see components/ingest.py).

from kfp.dsl import HTML, Dataset, Input, Metrics, Output


def profile(version: str, catalog: Input[Dataset], mlflow_tracking_uri: str) -> int:
    """Store the version's drift reference (its validation/test images through the model) in MLflow."""
    from dicom_router.steps import monitoring, step_settings

    return monitoring.profile_reference(
        version, catalog.path, step_settings(mlflow_tracking_uri=mlflow_tracking_uri)
    )


def drift(
    reference: str,
    current: str,
    by: list[str],
    window: str,
    webhook: str,
    mlflow_tracking_uri: str,
    report: Output[HTML],
    summary: Output[Metrics],
) -> bool:
    """Evidently drift of recent inference-log records vs the reference, per group; True on an alert."""
    from dicom_router.steps import monitoring, step_settings

    document = monitoring.run_drift_job(
        step_settings(mlflow_tracking_uri=mlflow_tracking_uri),
        reference=reference,
        current=current,
        by=by,
        window=window,
        webhook=webhook,
        report=report.path,
    )
    groups = document["groups"]
    summary.log_metric("groups", len(groups))
    summary.log_metric("alerting_groups", sum(bool(g["alert"]) for g in groups))
    summary.log_metric("new_sources", sum(bool(g["new_source"]) for g in groups))
    return bool(document["alert"])
