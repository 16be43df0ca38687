"""The KServe ``InferenceService`` that runs the ``bodypart-router`` predictor on Kubernetes.

A pure renderer: a frozen spec in, a plain dict (and its YAML) out, checked offline against the KServe
CRD's own OpenAPI schema. The pipelines' deploy step, the Helm chart and the checked-in example all call
``render_inference_service`` so there is one definition of how the model is served.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
CONTAINER_NAME = "kserve-container"
"""KServe injects the storage initializer only for the custom container of this name with STORAGE_URI."""
MODEL_MOUNT = "/mnt/models"
"""Where KServe's storage initializer downloads ``storageUri`` (its default mount path)."""
CRD_FILE = Path("kserve") / "serving.kserve.io_inferenceservices.yaml"
STORAGE_SCHEMES = ("s3://", "gs://", "pvc://", "https://")

# KServe >= 0.17 renamed the deployment modes (kserve/kserve#4608): RawDeployment -> "Standard" (plain
# Deployment + Service + HPA) and Serverless -> "Knative"; the old values are still accepted and
# up-converted. Standard is right here: Knative's selling point is scale-to-zero, which a GPU predictor
# must not do (a cold start schedules a GPU node, downloads the bundle and builds the CUDA session: tens
# of seconds while the router's queue waits), so minReplicas stays >= 1 and Standard gives the same
# Deployment/HPA without the Knative and queue-proxy dependencies. It is also 0.21's default, but it is
# set explicitly so a cluster configured with Knative as its default still gets a plain Deployment.
DEPLOYMENT_MODE = "Standard"

_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
_QUANTITY = rf"^(\+|-)?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?$"
"""Kubernetes resource quantity (the pattern the CRD itself uses)."""
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-_.A-Za-z0-9]{0,61}[A-Za-z0-9])?$")


class InferenceServiceSpec(BaseModel):
    """What varies between deployments; the defaults are the production shape (GPU, always warm)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("bodypart-router", max_length=53)
    """InferenceService name (DNS-1035); at most 53 so ``<name>-predictor`` is still a valid name."""
    namespace: str = Field("dicom-router", max_length=63)
    model_version: str
    """Registered version served, e.g. ``"7"`` (a label, to select pods by version, and an annotation)."""
    storage_uri: str
    """The bundle directory in the artifact store, downloaded to /mnt/models by the storage initializer."""
    image: str
    """Predictor image, pinned by tag or digest: ``:latest`` or no tag would make rollouts unreproducible."""
    service_account: str = "dicom-router-models"
    """Carries the S3 credentials secret the storage initializer uses; no credential is in the document."""
    gpu: bool = True
    gpu_count: int = Field(1, ge=1)
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    min_replicas: int = Field(1, ge=1)
    """Never 0: scale-to-zero means GPU cold starts while DICOM waits to be routed."""
    max_replicas: int = Field(3, ge=1)
    max_batch_size: int = Field(16, ge=1)
    """The server's own micro-batcher: the most images per ONNX Runtime call (V1 and V2 alike; no KServe
    batcher sidecar, whose agent would reach the server on loopback while it listens on the pod
    address)."""
    cpu_request: str = Field("2", pattern=_QUANTITY)
    """DICOM decoding runs on the CPU even when the network runs on the GPU."""
    cpu_limit: str = Field("4", pattern=_QUANTITY)
    memory_request: str = Field("4Gi", pattern=_QUANTITY)
    memory_limit: str = Field("8Gi", pattern=_QUANTITY)
    low_confidence: float = Field(0.5, ge=0.0, le=1.0)
    """Passed as DICOM_ROUTER_LOW_CONFIDENCE: below it a prediction is flagged for review."""
    port: int = Field(8080, ge=1, le=65535)

    @field_validator("name")
    @classmethod
    def _dns1035(cls, value: str) -> str:
        if not _DNS1035.fullmatch(value):
            raise ValueError("must be lower-case letters, digits and '-', starting with a letter")
        return value

    @field_validator("namespace", "service_account")
    @classmethod
    def _dns1123(cls, value: str) -> str:
        if not _DNS1123.fullmatch(value):
            raise ValueError("must be lower-case letters, digits and '-'")
        return value

    @field_validator("model_version")
    @classmethod
    def _label_value(cls, value: str) -> str:
        if not _LABEL_VALUE.fullmatch(value):
            raise ValueError("must be a Kubernetes label value (alphanumerics, '-', '_', '.'; at most 63)")
        return value

    @field_validator("storage_uri")
    @classmethod
    def _storage_scheme(cls, value: str) -> str:
        scheme = next((s for s in STORAGE_SCHEMES if value.startswith(s)), None)
        if scheme is None or not value[len(scheme) :].strip("/"):
            raise ValueError(f"must be {', '.join(s + '…' for s in STORAGE_SCHEMES)}, got {value!r}")
        return value

    @field_validator("image")
    @classmethod
    def _pinned_image(cls, value: str) -> str:
        if image_tag(value) in (None, "latest"):
            raise ValueError(f"must be pinned by a tag other than 'latest' or by a digest, got {value!r}")
        return value

    @classmethod
    def release(cls, registry: str, version: str, **fields: Any) -> InferenceServiceSpec:
        """The spec of release ``version``'s predictor image from ``registry``: the image follows
        ``gpu`` (see ``predictor_image``), so the two cannot disagree."""
        gpu = bool(fields.get("gpu", cls.model_fields["gpu"].default))
        return cls(image=predictor_image(registry, version, gpu=gpu), **fields)

    @model_validator(mode="after")
    def _replicas(self) -> InferenceServiceSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        return self


def image_tag(image: str) -> str | None:
    """The tag (or ``@digest``) an image reference pins, None when it pins nothing.

    A ``:`` before the last ``/`` is a registry port (``host:5000/repo``), not a tag.
    """
    if "@" in image:
        return image.split("@", 1)[1] or None
    _, colon, tag = image.rsplit("/", 1)[-1].partition(":")
    return tag if colon and tag else None


def predictor_image(registry: str, version: str, *, gpu: bool) -> str:
    """The predictor image for the node it runs on: ONNX Runtime's CUDA build (``predictor-gpu``) on GPU
    nodes, the CPU build elsewhere. The CPU image on a GPU node would leave the GPU idle; the GPU image
    elsewhere would pull gigabytes of CUDA libraries for nothing."""
    return f"{registry.rstrip('/')}/{'predictor-gpu' if gpu else 'predictor'}:{version}"


def example_spec() -> InferenceServiceSpec:
    """The inputs of ``serving/inferenceservice.example.yaml`` (a test keeps that file current)."""
    return InferenceServiceSpec.release(
        "ghcr.io/dicom-router",
        "0.1.0",
        model_version="1",
        storage_uri="s3://dicom-router/mlflow/artifacts/1/0123456789abcdef0123456789abcdef/artifacts/bundle",
    )


def render_inference_service(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The InferenceService document (plain dicts and lists, ready for YAML, JSON or a k8s client)."""
    labels = {
        "app.kubernetes.io/name": "dicom-router",
        "app.kubernetes.io/component": "predictor",
        "dicom-router/model-version": spec.model_version,
    }
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": spec.cpu_request, "memory": spec.memory_request},
        "limits": {"cpu": spec.cpu_limit, "memory": spec.memory_limit},
    }
    if spec.gpu:  # extended resources go in limits; the request defaults to the limit
        resources["limits"]["nvidia.com/gpu"] = str(spec.gpu_count)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "command": ["dicom-router"],  # independent of the image's ENTRYPOINT
        "args": ["serve", "--model", MODEL_MOUNT, "--port", str(spec.port)],
        "env": [
            {"name": "STORAGE_URI", "value": spec.storage_uri},
            # The pod's own address: where the kubelet's probes and the Service send traffic.
            {"name": "DICOM_ROUTER_SERVE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "DICOM_ROUTER_LOW_CONFIDENCE", "value": str(spec.low_confidence)},
            {"name": "DICOM_ROUTER_SERVE_MAX_BATCH_SIZE", "value": str(spec.max_batch_size)},
            # The root filesystem is read-only: state and caches go to the /tmp emptyDir.
            {"name": "DICOM_ROUTER_DATA_DIR", "value": "/tmp/dicom-router"},
            {"name": "HOME", "value": "/tmp"},
        ],
        "ports": [{"containerPort": spec.port, "protocol": "TCP"}],
        # The bundle is local (/mnt/models), so the server starts in seconds; the startup probe still
        # allows 10 min (CUDA initialisation, a busy node) before liveness can restart the container.
        "startupProbe": _http_probe("/v2/health/live", spec.port, period_s=5, failures=120),
        "readinessProbe": _http_probe("/v2/health/ready", spec.port, period_s=5, failures=3),
        "livenessProbe": _http_probe("/v2/health/live", spec.port, period_s=10, failures=3),
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    predictor: dict[str, Any] = {
        "minReplicas": spec.min_replicas,
        "maxReplicas": spec.max_replicas,
        "serviceAccountName": spec.service_account,
        "automountServiceAccountToken": False,  # the server never calls the Kubernetes API
        # No <SERVICE>_PORT variables: a Service named dicom-router-… would read as a DICOM_ROUTER_ setting.
        "enableServiceLinks": False,
        "labels": dict(labels),  # on the pods too, so policies and dashboards can select by version
        "securityContext": {"fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
    }
    if spec.gpu:
        predictor["nodeSelector"] = dict(spec.gpu_node_selector)
        predictor["tolerations"] = [dict(t) for t in spec.gpu_tolerations]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": labels,
            "annotations": {
                "serving.kserve.io/deploymentMode": DEPLOYMENT_MODE,
                # KServe adds prometheus.io scrape annotations to the pods for the server's /metrics.
                "serving.kserve.io/enable-prometheus-scraping": "true",
                "prometheus.kserve.io/port": str(spec.port),
                "prometheus.kserve.io/path": "/metrics",
                "dicom-router/model": f"models:/bodypart-router/{spec.model_version}",
            },
        },
        "spec": {"predictor": predictor},
    }


def _http_probe(path: str, port: int, *, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_s,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def to_yaml(doc: Mapping[str, Any]) -> str:
    """Block-style YAML in the document's own key order (what ``kubectl apply -f`` reads)."""
    return yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False, width=1000)


def render_example() -> str:
    """The text of ``serving/inferenceservice.example.yaml``."""
    header = (
        "# Generated from dicom_router.serving.inferenceservice.example_spec(); do not edit. Regenerate:\n"
        "#   .venv/bin/python -c 'from dicom_router.serving.inferenceservice import render_example; "
        'print(render_example(), end="")\' > serving/inferenceservice.example.yaml\n'
    )
    return header + to_yaml(render_inference_service(example_spec()))


def load_crd_schema(schema_dir: Path) -> dict[str, Any]:
    """The v1beta1 ``openAPIV3Schema`` of the KServe CRD in ``schema_dir`` (``../shared/k8s-schemas``).

    The file is 2 MB; it is parsed once per path. Treat the result as read-only (it is shared).
    """
    return _load_crd_schema(Path(schema_dir).resolve())


@functools.cache
def _load_crd_schema(schema_dir: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with (schema_dir / CRD_FILE).open(encoding="utf-8") as f:
        crd = yaml.load(f, Loader=loader)
    for version in crd["spec"]["versions"]:
        if version["name"] == "v1beta1":
            schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
            return schema
    raise ValueError(f"{schema_dir / CRD_FILE}: no v1beta1 version in the CRD")


def validate_inference_service(doc: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Readable ``path: message`` errors, [] when the API server would accept ``doc``.

    Unknown fields are errors, as ``kubectl apply`` (strict field validation) reports them, instead of
    being silently pruned: a misspelt ``maxBatchsize`` must fail here, not vanish on the cluster.
    """
    errors = [f"{_path(e.absolute_path)}: {e.message}" for e in _validator(schema).iter_errors(dict(doc))]
    if doc.get("apiVersion") != API_VERSION:
        errors.append(f"apiVersion: expected {API_VERSION!r}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != KIND:
        errors.append(f"kind: expected {KIND!r}, got {doc.get('kind')!r}")
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str) or not _DNS1035.fullmatch(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1035 label")
    return sorted(errors)


_VALIDATORS: dict[int, tuple[Mapping[str, Any], jsonschema.protocols.Validator]] = {}
"""Strict validators by schema identity (the schema is kept alive with it, so the id stays its own)."""


def _validator(schema: Mapping[str, Any]) -> jsonschema.protocols.Validator:
    cached = _VALIDATORS.get(id(schema))
    if cached is None or cached[0] is not schema:
        # OpenAPI v3.0 schema objects are closest to JSON Schema draft 4.
        cached = (schema, jsonschema.Draft4Validator(_strict(schema)))
        _VALIDATORS[id(schema)] = cached
    return cached[1]


def _strict(node: Any) -> Any:
    """A copy of a structural schema where objects with declared properties refuse undeclared ones."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":  # field name -> schema: recurse into the schemas, never the names
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("enum", "default", "required", "example"):
            out[key] = value
        else:
            out[key] = _strict(value)
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def _path(parts: Iterable[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"
