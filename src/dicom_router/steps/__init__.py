"""The pipeline steps: what each Kubeflow component calls, one module per concern.

Every KFP component in ``components/`` is one call into these modules, so a step behaves the same in a
pod, in ``kfp.local`` and in a test that calls it directly. Steps exchange small files inside KFP
artifacts (a Parquet catalog and its QA, a cache manifest, a model bundle); the state a person looks at
afterwards lives where the CLI puts it too: the bucket, MLflow and its registry. Modules that import
torch, MLflow or ONNX Runtime are imported inside the steps that need them, so an ingest pod starts in a
second instead of five.
"""

from __future__ import annotations

from typing import Any

from dicom_router.config import Settings

CATALOG_FILE = "catalog.parquet"
"""Inside a catalog artifact (a folder): the Parquet catalog, beside it ``catalog.parquet.qa.json``."""
CACHE_MANIFEST = "cache.json"
CANDIDATE_FILE = "candidate.json"
"""Inside a model artifact (the bundle folder): which MLflow run it came from, for registering it."""
MANIFEST_FILE = "inferenceservice.yaml"


def step_settings(*, mlflow_tracking_uri: str = "", gate_margin: float | None = None) -> Settings:
    """Settings of a step: the pod's environment, overridden by the run's parameters when they are set
    (an empty tracking URI means the deployment's own)."""
    overrides: dict[str, Any] = {}
    if mlflow_tracking_uri:
        overrides["mlflow_tracking_uri"] = mlflow_tracking_uri
    if gate_margin is not None:
        overrides["gate_margin"] = gate_margin
    return Settings(**overrides)
