"""One settings object for every component (env prefix ``DICOM_ROUTER_``).

Defaults describe the embedded single-machine stack; pointing the same code at AWS S3, MinIO or Ceph,
or at a remote MLflow, is a matter of setting variables, never of editing code.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _quota(root: Path) -> float | None:
    """CPUs the cgroup may use (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may really use: its affinity mask, capped by the cgroup's CPU quota (inside a
    pod ``os.cpu_count()`` is the node's, so a 2-CPU pod on a 64-core node would fork 64 workers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this package was installed from (editable install); used only for the shared-data default."""


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dicom-router"


class Settings(BaseSettings):
    """Configuration of every stage; each field is also the variable ``DICOM_ROUTER_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="DICOM_ROUTER_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    """Everything the embedded stack keeps: state, logs, generated credentials and keys, bucket files."""

    shared_dir: Path = REPO_ROOT.parent / "shared"
    """Research-licensed sample data used by tests and benchmarks (read in place, never copied)."""
    require_shared: bool = False
    """When set (CI), tests that need ``shared_dir`` fail instead of skipping."""

    s3_endpoint_url: str | None = None
    """S3 endpoint; empty means the embedded ``rclone serve s3`` of the local stack."""
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_region: str = "us-east-1"
    s3_bucket: str = "dicom-router"
    s3_port: int = 0
    """Port of the embedded S3 server; 0 picks a free one at first start and keeps it."""

    deid_key: SecretStr | None = None
    """Key of the keyed-hash pseudonyms; empty means a key generated once and kept in ``data_dir``."""

    header_range_bytes: int = 16 * 1024
    """First ranged read of an object during ingest; grown only when a header is longer."""
    max_image_pixels: int = 64_000_000
    """Rows x columns x samples above which decoding refuses with ``ImageTooLarge``."""
    workers: int = Field(default_factory=available_cpus)
    """Processes for ingest and decoding; default: the CPUs affinity and the cgroup quota allow."""
    report_memory_limit: str = "2GB"
    """DuckDB's memory limit for ``report`` (it spills to disk past it): one node reports on a catalog of
    tens of millions of instances inside a small pod."""

    weights_dir: Path | None = None
    """A folder of ImageNet weights files named ``ARCH.*`` (safetensors or torch): ``train --pretrained``
    looks here before packaged weights and timm's hub."""
    cache_uri: str | None = None
    """Where preprocessed training images are cached (local path or s3://); default ``data_dir/cache``."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking server or database; default SQLite in ``data_dir/mlflow`` with local artifacts."""
    registered_model: str = "bodypart-router"
    gate_margin: float = 0.02
    """Promotion gate: the most any class's recall may drop (absolute) against the champion."""
    gate_floor: float = 0.80
    """Promotion gate: the macro-F1 the first model must reach."""
    promotion_approval: Literal["required", "auto"] = "required"
    """``required``: once a champion exists, a passed gate files a request that a person approves
    (``promote --approve``); ``auto``: a passed gate moves the champion at once."""

    model_uri: str | None = None
    """The model the server and router use; default ``models:/<registered_model>@champion``."""
    shadow_model_uri: str | None = None
    """The model the server runs in shadow beside it (answers logged, never routed by); default
    ``models:/<registered_model>@challenger`` when the served model is the ``champion`` alias; ``none``
    turns shadow off."""
    serve_port: int = 0
    """Port of the embedded model server; 0 picks a free one at first start and keeps it."""
    serve_host: str = "127.0.0.1"
    """Interface the model server binds: loopback in the embedded stack; a pod sets its own address
    (``status.podIP``), where the kubelet's probes and the Service send traffic."""
    serve_shutdown_grace_s: int = Field(20, ge=1)
    """After SIGTERM, how long requests in flight may take before the server exits anyway: under the
    pod's ``terminationGracePeriodSeconds`` (30), so it ends before the kubelet kills it."""
    serve_url: str | None = None
    """Model server the router calls; empty means the embedded stack's server."""
    low_confidence: float = 0.5
    """Predictions below this confidence are marked ``low_confidence`` (and go to review by default)."""
    serve_max_batch_size: int = 16
    """Micro-batching: the most concurrent images one ONNX Runtime call classifies."""
    serve_max_latency_ms: float = 5.0
    """Micro-batching: how long the first request of a batch waits for others."""
    serve_max_request_bytes: int = 64 * 1024 * 1024
    """Request bodies above this are refused with 413 before they are read."""
    serve_decode_workers: int = 2
    """Processes that decode DICOM for the server, so its event loop never blocks."""
    model_poll_s: float = 10.0
    """How often the server checks whether the model alias moved (reload without restart)."""

    orthanc_url: str | None = None
    """Orthanc REST URL the router talks to; empty means the embedded stack's Orthanc."""
    orthanc_user: str | None = None
    orthanc_password: SecretStr | None = None
    """Orthanc credentials; empty means the generated ones of the embedded stack."""
    orthanc_aet: str = "DICOMROUTER"
    """Orthanc's own AE title (modalities send to it; destinations see it as the calling AET)."""
    orthanc_calling_aet: str = "MODALITY"
    """The AE title Orthanc accepts C-STOREs from (declared modality, host 127.0.0.1 locally)."""
    orthanc_http_port: int = 0
    orthanc_dicom_port: int = 0
    """Ports of the embedded Orthanc; 0 picks free ones at first start and keeps them."""

    stack_ready_timeout_s: float = 600.0
    """How long ``stack up`` waits for a service that is still running but not yet ready (a busy
    machine); one that exits fails at once, quoting its log."""

    route_rules: Path | None = None
    """Routing rules YAML; empty means the example rules shipped with the package."""
    route_concurrency: int = 8
    """Instances the router handles at once: its threads mostly wait on Orthanc and the model server,
    and more of them let the server batch (bench/routing.py on 2 cores, mean of 4 runs: 20.6 instances/s
    at 4, 22.4 at 8; 16 gained nothing more)."""
    route_poll_s: float = 0.1
    """How often an idle router looks at the queue."""
    route_retry_base_s: float = 1.0
    route_retry_cap_s: float = 60.0
    """Backoff after a failed attempt (base·2^attempts, capped) and while the model server or Orthanc
    cannot be reached (base·2^outage-length, capped; no attempt is spent)."""
    route_max_attempts: int = 12
    """Failed attempts (an unreadable answer, a model-server error on this instance, a refused forward)
    after which an instance becomes a dead letter, marked ``RoutedTo=review`` with its reason."""
    route_lease_s: float = 120.0
    """How long a router owns the queue rows it claimed; a killed router's rows return after this."""
    route_host: str = "127.0.0.1"
    route_port: int = 0
    """Where the router serves ``/health`` and ``/metrics`` (a pod binds its pod address); port 0 picks
    a free one."""
    route_changes_poll_s: float = 30.0
    """How often the router reads Orthanc's change log: instances the hook missed, and labels reviewers
    set as ``BodyPartReviewed`` in Orthanc."""
    route_stuck_after_s: float = 600.0
    """``/health`` fails when routing made no pass, or an instance has been due, for this long."""
    review_token: SecretStr | None = None
    """Bearer token of the router's review API (``/review``); empty: the embedded stack generates one
    (``secrets_dir``), a pod without it serves no review API."""

    inference_log_uri: str | None = None
    """Where the router logs one de-identified record per classified instance (Parquet parts, local or
    s3://); default ``s3://<bucket>/inference-log``."""
    inference_log_flush_s: float = 30.0
    """The router writes its inference-log records at least this often (and every 256 records)."""
    evidently_workspace: Path | None = None
    """The Evidently workspace drift runs write snapshots to and the UI serves; default
    ``data_dir/evidently``."""
    evidently_port: int = 0
    """Port of the embedded Evidently UI; 0 picks a free one at first start and keeps it."""
    drift_rules: Path | None = None
    """Drift alert rules YAML (thresholds, minimum samples per group); empty means the defaults."""
    drift_webhook_url: str | None = None
    """Where a drift alert is POSTed (the ``drift --json`` document)."""
    drift_window: str = "24h"
    """Scheduled drift runs compare the reference with this much recent traffic."""
    drift_every: str = "1h"
    """How often the embedded stack's scheduled drift run repeats."""
    deployment: str = "default"
    """Names this deployment's project in the Evidently UI."""

    k8s_namespace: str = "dicom-router"
    """Namespace of the platform's resources on Kubernetes (InferenceService, jobs)."""
    k8s_image_registry: str = "ghcr.io/dicom-router"
    """Where the project's images (predictor, components, orthanc, worker) are pushed."""
    k8s_cluster: str | None = None
    """Where the pipelines' deploy step applies the InferenceService: ``in-cluster`` or a kubeconfig
    path; empty means a dry run (the manifest is only written as an artifact)."""
    kfp_host: str | None = None
    """Kubeflow Pipelines endpoint for ``pipeline run`` without ``--local``."""

    def as_env(self) -> dict[str, str]:
        """These settings as ``DICOM_ROUTER_*`` variables: a child process (a stack service, a pipeline
        step) configured from them sees the same deployment."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"DICOM_ROUTER_{name.upper()}"] = str(value)
        return env

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.data_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def cache_location(self) -> str:
        return self.cache_uri or str(self.data_dir / "cache")

    @property
    def secrets_dir(self) -> Path:
        """Generated credentials and keys (mode 0700); back it up with the deployment."""
        return self.data_dir / "secrets"

    def stored_secret(self, name: str, make: Callable[[], str]) -> str:
        """``secrets_dir/name`` (mode 0600), written with ``make()`` by its first use.

        Processes that start together (a pipeline's parallel ingest shards, the stack's servers) must
        agree: the value is written aside and hard-linked into place, which fails when the file exists,
        so a reader never sees it half written and every process reads the first writer's value."""
        path = self.secrets_dir / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, aside = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.")  # mode 0600
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(make())
                with contextlib.suppress(FileExistsError):  # another process was first: its value stands
                    os.link(aside, path)
            finally:
                Path(aside).unlink()
        return path.read_text()

    @property
    def inference_log(self) -> str:
        return self.inference_log_uri or f"s3://{self.s3_bucket}/inference-log"

    @property
    def evidently_dir(self) -> Path:
        return self.evidently_workspace or self.data_dir / "evidently"

    @property
    def routing_dir(self) -> Path:
        return self.data_dir / "routing"

    @property
    def routing_queue(self) -> Path:
        """The routing queue and audit (SQLite), shared by Orthanc's hook and the router."""
        return self.routing_dir / "queue.db"

    @property
    def stack_dir(self) -> Path:
        """State and logs of the embedded stack's processes."""
        return self.data_dir / "stack"
