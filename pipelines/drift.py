# mypy: disable-error-code="import-untyped"
"""The drift pipeline: recent inference-log records vs the champion's stored reference, overall and per
site and scanner (Evidently); the report as an HTML artifact, the alert to the webhook.

Scheduled on Kubeflow as a recurring run (``kfp.Client().create_recurring_run(...,
pipeline_package_path="pipelines/compiled/drift.yaml", cron_expression="0 0 * * * *")``); the Helm
chart's CronJob and the embedded stack run the same analysis through ``dicom-router drift``.
"""

from typing import Any

from kfp import dsl

from dicom_router.deployment import Resources
from pipelines.pods import pod

NAME = "dicom-router-drift"


def build(base_image: str, resources: Resources) -> Any:
    """The pipeline, its component on ``base_image``."""
    from components import make

    c = make(base_image)

    def drift(
        reference: str = "models:/bodypart-router@champion",
        current: str = "s3://dicom-router/inference-log",
        by: list[str] = ["site_id", "scanner_id"],  # noqa: B006 (KFP default)
        window: str = "24h",
        webhook: str = "",
        mlflow_tracking_uri: str = "",
    ) -> bool:
        """Drift of the last ``window`` of routed instances against the reference, per group.

        Args:
            reference: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (its stored reference) or a Parquet.
            current: the inference log (``s3://bucket/prefix``).
            by: group columns; one report per value (a never-seen value alerts as a new source).
            window: how much recent traffic to compare (``24h``, ``7d``).
            webhook: POST the drift document here when an alert fires; empty: the deployment's setting.
            mlflow_tracking_uri: MLflow tracking server; empty means the deployment's.
        """
        task = pod(
            c.drift(
                reference=reference,
                current=current,
                by=by,
                window=window,
                webhook=webhook,
                mlflow_tracking_uri=mlflow_tracking_uri,
            ),
            cpu=resources.cpu,
            memory=resources.memory,
        )
        return task.outputs["Output"]  # type: ignore[no-any-return]

    return dsl.pipeline(name=NAME)(drift)
