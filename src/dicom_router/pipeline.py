"""Kubeflow Pipelines, library side: the steps the components call, compiling, and local runs.

Every KFP component in ``components/`` is one call into this module (or the modules it uses), so a step
behaves the same in a pod, in ``kfp.local`` and in a test that calls it directly. Steps exchange small
files inside KFP artifacts (a Parquet catalog and its QA, a cache manifest, a model bundle); the state
a person looks at afterwards lives where the CLI puts it too: the bucket, MLflow and its registry.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

import dicom_router
from dicom_router.catalog import (
    SOURCE_METADATA,
    IngestResult,
    ingest,
    pixel_duplicates,
    qa_summary,
    read_catalog,
)
from dicom_router.config import REPO_ROOT, Settings
from dicom_router.dicom.errors import ERROR_TYPES, DicomInputError
from dicom_router.dicom.header import read_header
from dicom_router.storage import S3Store, Store, open_store, read_uri, upload_folder, write_uri

if TYPE_CHECKING:  # the training code (torch) loads only in the steps that train
    from dicom_router.train import TrainConfig

# Modules that import torch, MLflow or ONNX Runtime are imported inside the steps that need them, so an
# ingest pod (or a local ingest task) starts in a second instead of five.

log = logging.getLogger(__name__)

PIPELINES: dict[str, str] = {"training": "pipelines.training", "drift": "pipelines.drift"}
"""Pipeline name → the module whose ``build(base_image, resources)`` returns the ``@dsl.pipeline``."""
COMPILED_DIR = REPO_ROOT / "pipelines" / "compiled"
CATALOG_FILE = "catalog.parquet"
"""Inside a catalog artifact (a folder): the Parquet catalog, beside it ``catalog.parquet.qa.json``."""
CACHE_MANIFEST = "cache.json"
CANDIDATE_FILE = "candidate.json"
"""Inside a model artifact (the bundle folder): which MLflow run it came from, for registering it."""
MANIFEST_FILE = "inferenceservice.yaml"


# --- configuration of the pods ------------------------------------------------------------------


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


S3_SECRET = "dicom-router-s3"
"""Secret with ``access_key_id``/``secret_access_key``: the bucket's credentials in every pod."""
DEID_SECRET = "dicom-router-deid"
"""Secret with ``deid_key``: every ingest pod must pseudonymise with the deployment's one key."""
CONFIG_MAP = "dicom-router-config"
CONFIG_KEYS = ("s3_endpoint_url", "s3_bucket", "mlflow_tracking_uri", "cache_uri", "k8s_namespace")
"""Keys of the config map handed to every pod as ``DICOM_ROUTER_<KEY>`` (each optional)."""


def component_image(settings: Settings) -> str:
    """The image every component runs in: the library at this exact version."""
    return f"{settings.k8s_image_registry.rstrip('/')}/components:{dicom_router.__version__}"


def step_settings(*, mlflow_tracking_uri: str = "", gate_margin: float | None = None) -> Settings:
    """Settings of a step: the pod's environment, overridden by the run's parameters when they are set
    (an empty tracking URI means the deployment's own)."""
    overrides: dict[str, Any] = {}
    if mlflow_tracking_uri:
        overrides["mlflow_tracking_uri"] = mlflow_tracking_uri
    if gate_margin is not None:
        overrides["gate_margin"] = gate_margin
    return Settings(**overrides)


# --- ingest: plan, shards, merge ------------------------------------------------------------------


def plan_shards(
    source: str, settings: Settings, *, objects_per_shard: int, max_shards: int
) -> list[dict[str, int]]:
    """The ingest fan-out: one shard per ``objects_per_shard`` objects under ``source``, at most
    ``max_shards``, as ``{"index", "count"}`` items (listing is cheap next to reading headers, so each
    shard lists again and keeps its own keys)."""
    n = sum(1 for _ in open_store(source, settings).list())
    count = max(1, min(max_shards, math.ceil(n / max(1, objects_per_shard))))
    log.info("%d objects under %s → %d ingest shard(s)", n, source, count)
    return [{"index": i, "count": count} for i in range(count)]


def ingest_shard(
    source: str, out_dir: str, settings: Settings, *, shard: int, count: int, labels_uri: str = ""
) -> IngestResult:
    """One shard's part catalog (and its QA) in ``out_dir``; labels default to ``<source>/labels.csv``."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return ingest(
        source,
        f"{out_dir}/{CATALOG_FILE}",
        settings,
        labels_uri=labels_uri or f"{source.rstrip('/')}/labels.csv",
        progress=False,
        shard=(shard, count),
    )


def merge_catalogs(
    part_dirs: Sequence[str], out_dir: str, settings: Settings, *, catalog_uri: str = ""
) -> IngestResult:
    """One catalog and one QA summary from the shards' parts, as if one ingest had read everything.

    Rows are concatenated; duplicates by SOP UID and content are recomputed over all rows; pixel
    duplicates found inside a shard are kept, and fingerprint matches that span shards are confirmed by
    hashing their pixel data. Written to ``out_dir`` and, when given, also to ``catalog_uri``.
    """
    if not part_dirs:
        raise ValueError("no part catalogs to merge")
    tables = [pq.read_table(io.BytesIO(read_uri(f"{d}/{CATALOG_FILE}", settings))) for d in part_dirs]
    qas = [json.loads(read_uri(f"{d}/{CATALOG_FILE}.qa.json", settings)) for d in part_dirs]
    sources = {(t.schema.metadata or {}).get(SOURCE_METADATA.encode(), b"").decode() for t in tables}
    if len(sources) != 1:
        raise ValueError(f"parts come from different sources: {sorted(sources)}")
    source = sources.pop()
    table = pa.concat_tables(tables).sort_by("key")
    frame = table.to_pandas()
    errors = sorted((_input_error(e) for qa in qas for e in qa["unreadable"]), key=lambda e: e.path)
    missing = {k: v for qa in qas for k, v in qa["missing_required"].items()}
    skipped = sorted({k for qa in qas for k in qa["skipped_sidecars"]})
    same_pixels = _merged_pixel_duplicates(
        open_store(source, settings),
        [
            (dict(zip(t["key"].to_pylist(), t["pixel_fingerprint"].to_pylist(), strict=True)), qa)
            for t, qa in zip(tables, qas, strict=True)
        ],
        {str(k): int(v) for k, v in zip(frame["key"], frame["size"], strict=True)},
        settings,
    )
    labels = _merged_labels([qa["labels"] for qa in qas])
    qa = qa_summary(frame, errors, missing, skipped, same_pixels, source=source, labels=labels)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    qa_text = json.dumps(qa, indent=2).encode()
    targets = [f"{out_dir}/{CATALOG_FILE}", *([catalog_uri] if catalog_uri else [])]
    for target in targets:
        write_uri(target, buf.getvalue(), settings)
        write_uri(target + ".qa.json", qa_text, settings)
    return IngestResult(targets[-1], targets[-1] + ".qa.json", frame, qa, errors)


def read_ingest_result(catalog_uri: str, settings: Settings) -> IngestResult:
    """A written catalog and its QA summary back as an ingest result (for tables and exit codes after a
    pipeline run)."""
    frame, _ = read_catalog(catalog_uri, settings)
    qa = json.loads(read_uri(catalog_uri + ".qa.json", settings))
    errors = [_input_error(e) for e in qa["unreadable"]]
    return IngestResult(catalog_uri, catalog_uri + ".qa.json", frame, qa, errors)


def _input_error(entry: Mapping[str, str]) -> DicomInputError:
    """A QA summary's unreadable entry back into the contract's typed error."""
    kind = next((t for t in ERROR_TYPES if t.type == entry["type"]), DicomInputError)
    return kind(entry["key"], entry["reason"])


def _merged_pixel_duplicates(
    store: Store,
    parts: Sequence[tuple[dict[str, str | None], Mapping[str, Any]]],
    sizes: Mapping[str, int],
    settings: Settings,
) -> list[list[str]]:
    """Each part's own pixel-duplicate groups, plus those whose fingerprint matches span parts."""
    by_fingerprint: defaultdict[str, set[int]] = defaultdict(set)
    for index, (fingerprints, _) in enumerate(parts):
        for fingerprint in fingerprints.values():
            if fingerprint:
                by_fingerprint[fingerprint].add(index)
    spanning = {f for f, shards in by_fingerprint.items() if len(shards) > 1}
    rows = [
        {"key": key, "pixel_fingerprint": fingerprint}
        for fingerprints, _ in parts
        for key, fingerprint in fingerprints.items()
        if fingerprint in spanning
    ]
    cross = {str(r["key"]) for r in rows}
    kept = [g for _, qa in parts for g in qa["duplicates"]["pixels"] if not set(g) & cross]
    locations: dict[str, tuple[int | None, int | None]] = {}
    for key in sorted(cross):
        header = read_header(
            _prefix_reader(store, key, sizes[key]), sizes[key], key, settings.header_range_bytes
        )
        locations[key] = (header.pixel_start, header.pixel_length)
    return sorted(kept + pixel_duplicates(store, rows, locations))


def _prefix_reader(store: Store, key: str, size: int) -> Callable[[int], bytes]:
    """``read_header``'s fetch: the object's first ``n`` bytes (all of it once ``n`` reaches its size)."""

    def fetch(n: int) -> bytes:
        return store.read(key, n if n < size else None)

    return fetch


def _merged_labels(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Labels QA over all parts (every shard matched labels against the whole listing)."""
    if not any(parts):
        return {}
    return {
        "labelled": sum(int(p["labelled"]) for p in parts),
        "unlabelled": sorted(k for p in parts for k in p["unlabelled"]),
        "invalid_labels": sorted((e for p in parts for e in p["invalid_labels"]), key=lambda e: e["key"]),
        "labels_without_object": parts[0]["labels_without_object"],
    }


# --- preprocess, train, evaluate ------------------------------------------------------------------


def _recipe_configs(
    recipe: str, arch: str, *, epochs: int = 0, image_size: int = 0, **fields: Any
) -> list[TrainConfig]:
    """The TrainConfigs of one pipeline candidate: ``arch`` may name an ensemble (``a+b``); 0 for epochs
    or image size means the recipe's own."""
    from dicom_router.train import recipe_config

    given = {"epochs": epochs, "image_size": image_size}
    chosen = {k: v for k, v in given.items() if v} | fields
    return [recipe_config(recipe, arch=member, **chosen) for member in arch.split("+")]


def preprocess(
    catalog_dir: str, out_dir: str, settings: Settings, *, image_size: int, recipe: str = "scratch"
) -> dict[str, Any]:
    """Decode every labelled image of the catalog once into the shared cache; the manifest says where,
    so the training tasks (on other nodes) read arrays instead of DICOM."""
    from dicom_router.candidates import load_labelled

    labelled = load_labelled(settings, catalog=f"{catalog_dir}/{CATALOG_FILE}")
    [train_config] = _recipe_configs(recipe, "any", image_size=image_size)
    config = train_config.preprocess
    cached, errors = labelled.cached(settings, config, progress=False)
    manifest = {
        "cache_uri": settings.cache_location,
        "preprocess": config.model_dump(),
        "fingerprint": config.fingerprint(),
        "source": labelled.source,
        "images": len(cached.keys),
        "errors": [{"file": e.path, **e.as_dict()} for e in errors],
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def train_one(
    catalog_dir: str,
    cache_dir: str,
    model_dir: str,
    settings: Settings,
    *,
    arch: str,
    epochs: int,
    image_size: int,
    batch_size: int = 32,
    seed: int = 0,
    recipe: str = "scratch",
    tta: bool = False,
) -> dict[str, Any]:
    """One candidate on the catalog's persisted split: an architecture, or an ensemble ``a+b`` whose
    members train here one after the other (an MLflow run each, and one for the ensemble). Its bundle
    goes to ``model_dir`` with ``candidate.json`` (run id, test metrics) beside it."""
    import mlflow

    from dicom_router.candidates import load_labelled, train_candidates

    manifest = json.loads((Path(cache_dir) / CACHE_MANIFEST).read_text())
    settings = settings.model_copy(update={"cache_uri": manifest["cache_uri"]})
    labelled = load_labelled(settings, catalog=f"{catalog_dir}/{CATALOG_FILE}")
    configs = _recipe_configs(
        recipe, arch, epochs=epochs, image_size=image_size, batch_size=batch_size, seed=seed
    )
    candidates, _ = train_candidates(
        settings, labelled, configs, register=False, ensemble=True, tta=tta, seed=seed, progress=False
    )
    candidate = candidates[-1]  # the ensemble when there are several members
    with tempfile.TemporaryDirectory() as tmp:
        downloaded = mlflow.artifacts.download_artifacts(
            run_id=candidate.run_id, artifact_path="bundle", dst_path=tmp
        )
        shutil.copytree(downloaded, model_dir, dirs_exist_ok=True)
    summary = {"run_id": candidate.run_id, "arch": candidate.name, "report": candidate.report}
    (Path(model_dir) / CANDIDATE_FILE).write_text(json.dumps(summary, indent=2))
    return summary


@dataclass
class Evaluation:
    """All candidates re-scored on their shared test split through the serving path; the best one."""

    best: int
    candidates: list[dict[str, Any]]

    @property
    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = self.candidates[self.best]["report"]
        return report


def evaluate_candidates(model_dirs: Sequence[str], best_dir: str, settings: Settings) -> Evaluation:
    """Score each bundle on the persisted test split (ONNX Runtime from DICOM bytes, as the server and the
    gate do) and copy the best by macro-F1 to ``best_dir`` (earlier candidates win ties)."""
    from dicom_router.inference import Bundle
    from dicom_router.promotion import locate, score

    if not model_dirs:
        raise ValueError("no candidates to evaluate")
    bundles = [Bundle(Path(d)) for d in model_dirs]
    splits = {b.card["split_fingerprint"] for b in bundles}
    if len(splits) != 1:
        raise ValueError(f"candidates were trained on different splits ({sorted(splits)}): not comparable")
    candidates = []
    for directory, bundle in zip(model_dirs, bundles, strict=True):
        summary = json.loads((Path(directory) / CANDIDATE_FILE).read_text())
        report = score(bundle, *locate(settings, bundle.card), settings)
        candidates.append({"run_id": summary["run_id"], "arch": bundle.card["arch"], "report": report})
    best = max(range(len(candidates)), key=lambda i: (candidates[i]["report"]["macro_f1"], -i))
    shutil.copytree(model_dirs[best], best_dir, dirs_exist_ok=True)
    for c in candidates:
        log.info("%s: macro-F1 %.4f on the test split", c["arch"], c["report"]["macro_f1"])
    return Evaluation(best, candidates)


def metrics_of(report: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics a KFP ``Metrics`` artifact shows for an evaluation report."""
    from dicom_router import LABELS

    return {
        "macro_f1": float(report["macro_f1"]),
        "accuracy": float(report["accuracy"]),
        "weighted_f1": float(report["weighted_f1"]),
        "ece": float(report["ece"]),
        "n": float(report["n"]),
        **{f"recall_{label}": float(report["per_class"][label]["recall"]) for label in LABELS},
    }


# --- register, gate, promote, deploy --------------------------------------------------------------


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


def profile_reference(version: str, catalog_dir: str, settings: Settings) -> int:
    """The drift reference of ``version`` (its validation/test images through the model), stored with
    the version in MLflow, so ``drift --reference models:/…`` works; the number of rows."""
    from dicom_router.monitoring.reference import reference_for_model

    model = f"models:/{settings.registered_model}/{version}"
    return len(reference_for_model(settings, model, f"{catalog_dir}/{CATALOG_FILE}"))


def run_drift_job(
    settings: Settings,
    *,
    reference: str,
    current: str,
    by: Sequence[str],
    window: str,
    webhook: str,
    report: str,
) -> dict[str, Any]:
    """One scheduled drift analysis (the drift pipeline's step): the contract's ``drift`` document."""
    from dicom_router.monitoring.drift import AlertRules
    from dicom_router.monitoring.job import DriftJob, by_columns, drift_job, parse_window

    job = DriftJob(
        reference=reference,
        current=current,
        by=by_columns(by),
        rules=AlertRules.from_yaml(settings.drift_rules) if settings.drift_rules else AlertRules(),
        window=parse_window(window) if window else None,
        webhook=webhook or settings.drift_webhook_url,
        workspace=settings.evidently_dir,
        deployment=settings.deployment,
        report_uri=report,
    )
    return drift_job(settings, job).document()


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
    spec = InferenceServiceSpec(
        namespace=settings.k8s_namespace,
        model_version=str(version),
        storage_uri=storage_uri,
        image=f"{settings.k8s_image_registry.rstrip('/')}/predictor:{dicom_router.__version__}",
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


# --- compile and run ------------------------------------------------------------------------------


def build_pipeline(name: str, settings: Settings, resources: Resources | None = None) -> Any:
    """The ``@dsl.pipeline`` called ``name``, its components on this version's image."""
    if name not in PIPELINES:
        raise KeyError(f"no pipeline {name!r}; known: {', '.join(PIPELINES)}")
    module = importlib.import_module(PIPELINES[name])
    return module.build(component_image(settings), resources or Resources())


def compile_pipelines(
    names: Sequence[str] | None = None,
    *,
    settings: Settings | None = None,
    out_dir: Path = COMPILED_DIR,
    resources: Resources | None = None,
) -> list[Path]:
    """Compile each pipeline (default: all) to ``out_dir/<name>.yaml``, the IR YAML a Kubeflow cluster
    takes as it is (UI upload or ``kfp.Client().create_run_from_pipeline_package``)."""
    from kfp import compiler

    settings = settings or Settings()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or list(PIPELINES):
        path = out_dir / f"{name}.yaml"
        compiler.Compiler().compile(build_pipeline(name, settings, resources), str(path))
        written.append(path)
    return written


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@dataclass(frozen=True)
class TaskTime:
    task: str
    """The task's folder under the run (``for-loop-2-iteration-0/train`` for a loop iteration)."""
    seconds: float
    started_s: float
    """When it started, from the start of the run."""


@contextlib.contextmanager
def _timed_tasks(root: Path) -> Iterator[list[TaskTime]]:
    """Wall time of each task's subprocess (start, imports, executor, the step): kfp.local reports none,
    so the subprocess handler's ``run`` is timed for the duration of the run (kfp is pinned exactly)."""
    from kfp.local import subprocess_task_handler

    handler = subprocess_task_handler.SubprocessTaskHandler
    original = handler.run
    times: list[TaskTime] = []
    lock = threading.Lock()
    run_start = time.perf_counter()

    def timed(self: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self)
        finally:
            seconds = time.perf_counter() - start
            with lock:
                times.append(TaskTime(_task_folder(self.full_command, root), seconds, start - run_start))

    handler.run = timed
    try:
        yield times
    finally:
        handler.run = original


def _task_folder(command: Sequence[str], root: Path) -> str:
    """The task's folder under its run, from the executor input (where ``executor_output.json`` goes)."""
    for i, part in enumerate(command[:-1]):
        if part == "--executor_input":
            output = Path(json.loads(command[i + 1])["outputs"]["outputFile"])
            return Path(*output.parent.relative_to(root).parts[1:]).as_posix()
    return "?"


@dataclass
class LocalRun:
    """What a local run left: its folder (every task's artifacts), outputs, timings and decisions."""

    name: str
    run_dir: Path
    outputs: dict[str, Any]
    tasks: list[TaskTime]
    """In the order they started."""
    wall_s: float
    task_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each task folder's output parameters (``executor_output.json``)."""

    def artifact(self, task: str, output: str) -> Path | None:
        """A task's output artifact on disk (None when the task did not run, e.g. a skipped branch)."""
        path = self.run_dir / task / output
        return path if path.exists() else None

    @property
    def decision(self) -> dict[str, Any] | None:
        """The recorded gate decision (the ``promote`` or ``record-refusal`` task's), if it ran."""
        for task in ("promote", "promote-2"):
            if "Output" in self.task_outputs.get(task, {}):
                decision: dict[str, Any] = json.loads(self.task_outputs[task]["Output"])
                return decision
        return None

    @property
    def manifest(self) -> Path | None:
        """The InferenceService manifest the deploy step wrote (None when the gate refused)."""
        folder = self.artifact("deploy", "manifest")
        return folder / MANIFEST_FILE if folder else None


def _restore_root_logger(level: int, handlers: list[logging.Handler]) -> None:
    logging.root.setLevel(level)
    logging.root.handlers[:] = handlers


def run_local(
    name: str, params: Mapping[str, Any], settings: Settings, *, log_file: Path | None = None
) -> LocalRun:
    """Run pipeline ``name`` on this machine with ``kfp.local.SubprocessRunner`` (each step a subprocess
    of this Python, the settings handed over through the environment) against the embedded default:
    the local S3 is started when no endpoint is configured; MLflow is the configured store.

    kfp.local streams every task's executor input and logs to stdout; ``log_file`` sends them there."""
    from kfp import local

    from dicom_router import stack
    from dicom_router.registry import CANDIDATES_EXPERIMENT, PROMOTIONS_EXPERIMENT, experiment

    if settings.s3_endpoint_url is None:
        stack.s3_up(settings)
    for name_ in (CANDIDATES_EXPERIMENT, PROMOTIONS_EXPERIMENT):
        # Create (and, for SQLite, migrate) the tracking store here: parallel training tasks that both
        # find it missing race on its schema migration ("duplicate column name").
        experiment(settings, name_)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    root = settings.data_dir / "pipelines" / f"{name}-{stamp}"
    root.mkdir(parents=True)
    pipeline_func = build_pipeline(name, settings)
    start = time.perf_counter()
    with (
        _environment(settings.as_env()),
        _timed_tasks(root) as times,
        warnings.catch_warnings(),
        contextlib.ExitStack() as stack_,
    ):
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            stack_.enter_context(contextlib.redirect_stdout(stack_.enter_context(log_file.open("a"))))
        # kfp.local points the root logger at (the redirected) stdout and sets INFO: put it back after.
        stack_.callback(_restore_root_logger, logging.root.level, list(logging.root.handlers))
        # Requests, GPUs and node selectors are for the cluster, and the components' image holds this very
        # library: kfp.local warns about both once per task.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
        warnings.filterwarnings("ignore", message=".*non-Python base image")
        local.init(
            runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
        )
        task = pipeline_func(**dict(params))
    wall = time.perf_counter() - start
    [run_dir] = [p for p in root.iterdir() if p.is_dir()]
    outputs = {k: (v.path if hasattr(v, "path") else v) for k, v in task.outputs.items()}
    task_outputs = {
        str(f.parent.relative_to(run_dir)): json.loads(f.read_text()).get("parameterValues", {})
        for f in sorted(run_dir.rglob("executor_output.json"))
    }
    return LocalRun(name, run_dir, outputs, sorted(times, key=lambda t: t.started_s), wall, task_outputs)


def submit(name: str, params: Mapping[str, Any], settings: Settings, *, host: str) -> str:
    """Start pipeline ``name`` on a Kubeflow Pipelines endpoint (the same IR YAML ``compile`` writes,
    compiled for these settings' image registry); the run's id."""
    from kfp import Client

    with tempfile.TemporaryDirectory() as tmp:
        [package] = compile_pipelines([name], settings=settings, out_dir=Path(tmp))
        result = Client(host=host).create_run_from_pipeline_package(
            str(package), arguments=dict(params), experiment_name="dicom-router", enable_caching=False
        )
    return str(result.run_id)
