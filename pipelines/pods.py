# mypy: disable-error-code="import-untyped"
"""What every task of every pipeline gets: the deployment's configuration, requests, no caching."""

from typing import Any

from kfp import kubernetes

from dicom_router.pipeline import CONFIG_KEYS, CONFIG_MAP, S3_SECRET


def pod(task: Any, *, cpu: str, memory: str) -> Any:
    """Every task: the deployment's S3 credentials and configuration as ``DICOM_ROUTER_*`` variables,
    requests, and no caching (every step reads or changes live state: the bucket, MLflow, the cluster)."""
    kubernetes.use_secret_as_env(
        task,
        secret_name=S3_SECRET,
        secret_key_to_env={
            "access_key_id": "DICOM_ROUTER_S3_ACCESS_KEY_ID",
            "secret_access_key": "DICOM_ROUTER_S3_SECRET_ACCESS_KEY",
        },
        optional=True,
    )
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=CONFIG_MAP,
        config_map_key_to_env={key: f"DICOM_ROUTER_{key.upper()}" for key in CONFIG_KEYS},
        optional=True,
    )
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    task.set_caching_options(False)
    return task
