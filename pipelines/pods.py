# mypy: disable-error-code="import-untyped"
"""What every task of every pipeline gets: the deployment contract's Secrets and ConfigMap as
``DICOM_ROUTER_*`` variables (``dicom_router.deployment``), requests, no caching."""

from typing import Any

from kfp import kubernetes

from dicom_router.deployment import CONFIG_KEYS, CONFIG_MAP, PIPELINE_SECRETS, config_env


def pod(task: Any, *, cpu: str, memory: str) -> Any:
    """Every task: the deployment's S3 credentials, pseudonym key, MLflow account and configuration,
    requests, and no caching (every step reads or changes live state: the bucket, MLflow, the cluster).
    Each step gets all of them, so no step can miss the one it needs (a profile step without the
    pseudonym key once made ``site_id``s of its own)."""
    for secret in PIPELINE_SECRETS:
        kubernetes.use_secret_as_env(
            task, secret_name=secret.name, secret_key_to_env=dict(secret.env), optional=secret.optional
        )
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=CONFIG_MAP,
        config_map_key_to_env={key: config_env(key) for key in CONFIG_KEYS},
        optional=False,
    )
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    task.set_caching_options(False)
    return task
