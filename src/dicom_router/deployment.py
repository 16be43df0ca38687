"""The deployment contract on Kubernetes: which Secrets and which ConfigMap the platform's pods read, the
keys in them and the ``Settings`` variables they become, and how the pipeline's tasks are sized.

The chart references these Secrets (it never holds a credential) and creates the ConfigMap; the
pipelines' pods (``pipelines/pods.py``) read both; the README lists them. Tests compare the compiled
pipelines with what ``helm template`` renders, so the two can never drift apart again. Standard library
only (and the package's version): the pipelines' compiler and the chart tests import it without the
training stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import dicom_router


@dataclass(frozen=True)
class SecretContract:
    """A Secret the deployment creates beforehand; the chart names it by ``value``."""

    name: str
    """Its default name (the chart's default of ``value``)."""
    value: str
    """The chart value that names it (``s3.existingSecret``)."""
    env: Mapping[str, str]
    """Key in the Secret → the variable a pod gets."""
    optional: bool
    """Whether a pod may start without it (credentials the platform may not need); a missing required
    Secret keeps the pod from starting rather than letting it run wrong."""


S3 = SecretContract(
    "dicom-router-s3",
    "s3.existingSecret",
    MappingProxyType(
        {
            "AWS_ACCESS_KEY_ID": "DICOM_ROUTER_S3_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "DICOM_ROUTER_S3_SECRET_ACCESS_KEY",
        }
    ),
    optional=True,
)
"""The bucket's credentials. KServe's key names, so its storage initializer can read the same Secret;
optional for clusters that grant bucket access to the pod's identity instead."""
DEID = SecretContract(
    "dicom-router-deid",
    "deid.existingSecret",
    MappingProxyType({"deid-key": "DICOM_ROUTER_DEID_KEY"}),
    optional=False,
)
"""The pseudonym key. Required: a step without it would make a key of its own, and its ``site_id``s
and ``scanner_id``s would match no other step's (every site would look new to the drift job)."""
MLFLOW_CLIENT = SecretContract(
    "dicom-router-mlflow-client",
    "mlflow.clientSecret",
    MappingProxyType({"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}),
    optional=True,
)
"""The MLflow account the platform's jobs log in with (the chart's MLflow requires basic auth)."""
PIPELINE_SECRETS = (S3, DEID, MLFLOW_CLIENT)
"""What every pipeline task reads (each step that touches storage, MLflow or pseudonyms needs them)."""

CONFIG_MAP = "dicom-router-config"
"""Created by the chart under this fixed name (one release per namespace): the compiled pipelines
cannot know a release name."""
CONFIG_KEYS = (
    "s3_endpoint_url",
    "s3_region",
    "s3_bucket",
    "mlflow_tracking_uri",
    "cache_uri",
    "inference_log_uri",
    "k8s_namespace",
)
"""Keys of ``CONFIG_MAP``; each is the ``Settings`` field of the same name."""


def config_env(key: str) -> str:
    """The variable a ``CONFIG_MAP`` key becomes (the ``Settings`` prefix and the key)."""
    return f"DICOM_ROUTER_{key.upper()}"


@dataclass(frozen=True)
class Resources:
    """Requests/limits and GPU scheduling of the pipeline's tasks (proposed settings ``k8s_*``)."""

    cpu: str = "2"
    memory: str = "4Gi"
    train_cpu: str = "8"
    train_memory: str = "32Gi"
    gpu_type: str = "nvidia.com/gpu"
    gpu_limit: int = 1
    gpu_node_selector: tuple[str, str] = ("nvidia.com/gpu.present", "true")
    """The label NVIDIA's GPU operator puts on GPU nodes."""
    gpu_toleration: str = "nvidia.com/gpu"
    """Taint key of GPU node pools (``Exists``/``NoSchedule``), so only GPU work lands there."""


def component_image(registry: str) -> str:
    """The image every pipeline component runs in: the library at this exact version."""
    return f"{registry.rstrip('/')}/components:{dicom_router.__version__}"
