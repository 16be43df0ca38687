"""Register the best candidate, run the promotion gate, promote, deploy the new champion."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dicom_router
from dicom_router.config import Settings
from dicom_router.steps import CANDIDATE_FILE, MANIFEST_FILE
from dicom_router.storage import S3Store, open_store, upload_folder

log = logging.getLogger(__name__)


def register_candidate(model_dir: str, settings: Settings) -> str:
    """Register the chosen bundle's MLflow run as a new version tagged ``candidate``; its version."""
    from dicom_router.registry import register_bundle

    summary = json.loads((Path(model_dir) / CANDIDATE_FILE).read_text())
    card = json.loads((Path(model_dir) / "card.json").read_text())
    preprocess = json.loads((Path(model_dir) / "preprocess.json").read_text())
    tags = {
        "arch": str(card["arch"]),
        "metadata": str(bool(preprocess.get("metadata", False))),
        "test_macro_f1": f"{summary['report']['macro_f1']:.4f}",
        "split_fingerprint": str(card["split_fingerprint"]),
        "data_fingerprint": str(card["data_fingerprint"]),
        "pipeline": "training",
    }
    return str(register_bundle(settings, summary["run_id"], tags).version)


def gate(version: str, settings: Settings) -> dict[str, Any]:
    """What the promotion gate would decide for ``version`` (nothing recorded, the alias stays)."""
    from dicom_router.promotion import promote

    return promote(settings, version=version, record=False)


class GateChanged(RuntimeError):
    """The gate decided differently at promotion than at the gate step (the champion moved meanwhile)."""


def promote_version(version: str, settings: Settings, *, expect_promoted: bool) -> dict[str, Any]:
    """Run and record the gate (the alias moves when it passes); refuse to go on when its verdict is not
    the one the pipeline's condition was taken on, so deploy never follows a refused gate."""
    from dicom_router.promotion import promote

    decision = promote(settings, version=version)
    if bool(decision["promoted"]) != expect_promoted:
        raise GateChanged(
            f"version {version}: the gate now says {'promote' if decision['promoted'] else 'refuse'} "
            f"({decision['reason']}); it said otherwise at the gate step"
        )
    return decision


def deploy(version: str, out_dir: str, settings: Settings, *, cluster: str = "") -> dict[str, Any]:
    """The InferenceService of ``version``: its bundle published to the bucket (what KServe's storage
    initializer downloads), the manifest written to ``out_dir``, and applied when ``cluster`` names one
    (``in-cluster`` or a kubeconfig path); otherwise a dry run. The local model server needs nothing:
    it follows the ``champion`` alias."""
    from dicom_router.registry import load_bundle
    from dicom_router.serving.inferenceservice import (
        InferenceServiceSpec,
        render_inference_service,
        to_yaml,
    )

    name = settings.registered_model
    bundle = load_bundle(settings, f"models:/{name}/{version}")
    storage_uri = f"s3://{settings.s3_bucket}/models/{name}/{version}"
    store = open_store(storage_uri, settings)
    if isinstance(store, S3Store):
        store.ensure_bucket()
    upload_folder(bundle.path, store)
    spec = InferenceServiceSpec.release(
        settings.k8s_image_registry,
        dicom_router.__version__,
        namespace=settings.k8s_namespace,
        model_version=str(version),
        storage_uri=storage_uri,
    )
    document = render_inference_service(spec)
    manifest = Path(out_dir) / MANIFEST_FILE
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(to_yaml(document))
    applied = apply_manifest(document, cluster) if cluster else False
    log.info("InferenceService for version %s: %s", version, "applied" if applied else f"dry run, {manifest}")
    return {
        "version": str(version),
        "storage_uri": storage_uri,
        "manifest": str(manifest),
        "applied": applied,
    }


def apply_manifest(document: Mapping[str, Any], cluster: str) -> bool:
    """Create or replace the InferenceService with the Kubernetes client (``in-cluster`` uses the pod's
    service account, anything else is a kubeconfig path)."""
    from kubernetes import client, config  # type: ignore[import-untyped]
    from kubernetes.client.rest import ApiException  # type: ignore[import-untyped]

    if cluster == "in-cluster":
        config.load_incluster_config()
    else:
        config.load_kube_config(config_file=cluster)
    group, _, api_version = str(document["apiVersion"]).partition("/")
    metadata = document["metadata"]
    api = client.CustomObjectsApi()
    where = {
        "group": group,
        "version": api_version,
        "namespace": metadata["namespace"],
        "plural": "inferenceservices",
    }
    try:
        api.create_namespaced_custom_object(body=dict(document), **where)
    except ApiException as exc:
        if exc.status != 409:
            raise
        current = api.get_namespaced_custom_object(name=metadata["name"], **where)
        body = {
            **document,
            "metadata": {**metadata, "resourceVersion": current["metadata"]["resourceVersion"]},
        }
        api.replace_namespaced_custom_object(name=metadata["name"], body=body, **where)
    return True
