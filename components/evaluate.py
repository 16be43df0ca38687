# mypy: disable-error-code="import-untyped"
"""Evaluate component: every candidate on the same test split, the best one out (calls the library)."""

# No `from __future__ import annotations`: KFP reads these annotations (see components/ingest.py).

from kfp.dsl import ClassificationMetrics, Input, Metrics, Model, Output


def evaluate(
    models: Input[list[Model]],
    mlflow_tracking_uri: str,
    best: Output[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
) -> str:
    """Re-score the candidates through the serving path; the best by macro-F1 is ``best``; its arch."""
    from dicom_router import LABELS
    from dicom_router.steps import step_settings, training

    evaluation = training.evaluate_candidates(
        [m.path for m in models], best.path, step_settings(mlflow_tracking_uri=mlflow_tracking_uri)
    )
    chosen = evaluation.candidates[evaluation.best]
    best.metadata.update({"arch": chosen["arch"], "run_id": chosen["run_id"]})
    for name, value in training.metrics_of(evaluation.report).items():
        metrics.log_metric(name, value)
    confusion.log_confusion_matrix(list(LABELS), evaluation.report["confusion_matrix"])
    return str(chosen["arch"])
