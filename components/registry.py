# mypy: disable-error-code="import-untyped"
"""Register, gate, promote and deploy components (calls into the library)."""

# No `from __future__ import annotations`: KFP reads these annotations (see components/ingest.py).

from kfp.dsl import Artifact, Input, Model, Output


def register(model: Input[Model], mlflow_tracking_uri: str) -> str:
    """Register the chosen candidate's run as a new version (tag ``candidate``); the version."""
    from dicom_router.steps import release, step_settings

    return release.register_candidate(model.path, step_settings(mlflow_tracking_uri=mlflow_tracking_uri))


def gate(version: str, mlflow_tracking_uri: str, gate_margin: float) -> bool:
    """Would the promotion gate promote ``version``? (Nothing recorded; the condition of the If.)"""
    from dicom_router.steps import release, step_settings

    settings = step_settings(mlflow_tracking_uri=mlflow_tracking_uri, gate_margin=gate_margin)
    return bool(release.gate(version, settings)["promoted"])


def promote(version: str, expect_promoted: bool, mlflow_tracking_uri: str, gate_margin: float) -> str:
    """Run and record the gate (the ``champion`` alias moves when it passes); the decision as JSON."""
    import json

    from dicom_router.steps import release, step_settings

    settings = step_settings(mlflow_tracking_uri=mlflow_tracking_uri, gate_margin=gate_margin)
    return json.dumps(release.promote_version(version, settings, expect_promoted=expect_promoted))


def deploy(version: str, cluster: str, mlflow_tracking_uri: str, manifest: Output[Artifact]) -> bool:
    """The champion's InferenceService: applied when ``cluster`` is set, else only the manifest."""
    from dicom_router.steps import release, step_settings

    result = release.deploy(
        version,
        manifest.path,
        step_settings(mlflow_tracking_uri=mlflow_tracking_uri),
        cluster=cluster,
    )
    manifest.metadata.update({"storage_uri": result["storage_uri"], "applied": result["applied"]})
    return bool(result["applied"])
