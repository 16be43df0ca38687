# mypy: disable-error-code="import-untyped"
"""Preprocess and train components (calls into the library)."""

# No `from __future__ import annotations`: KFP reads these annotations (see components/ingest.py).

from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def preprocess(catalog: Input[Dataset], image_size: int, recipe: str, cache: Output[Dataset]) -> None:
    """Decode every labelled image once into the shared cache (the manifest says where)."""
    from dicom_router.steps import step_settings, training

    training.preprocess(catalog.path, cache.path, step_settings(), image_size=image_size, recipe=recipe)


def train(
    catalog: Input[Dataset],
    cache: Input[Dataset],
    arch: str,
    epochs: int,
    image_size: int,
    batch_size: int,
    seed: int,
    recipe: str,
    tta: bool,
    cv_by: str,
    cv_folds: int,
    mlflow_tracking_uri: str,
    model: Output[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
) -> None:
    """Train one candidate (an architecture, or an ensemble ``a+b``), cross-validated by ``cv_by`` first
    when given; its bundle is the model artifact."""
    from dicom_router import LABELS
    from dicom_router.steps import step_settings, training

    summary = training.train_one(
        catalog.path,
        cache.path,
        model.path,
        step_settings(mlflow_tracking_uri=mlflow_tracking_uri),
        arch=arch,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        recipe=recipe,
        tta=tta,
        cv_by=cv_by,
        cv_folds=cv_folds,
    )
    model.metadata.update({"arch": summary["arch"], "run_id": summary["run_id"]})
    for name, value in training.metrics_of(summary["report"]).items():
        metrics.log_metric(name, value)
    confusion.log_confusion_matrix(list(LABELS), summary["report"]["confusion_matrix"])
