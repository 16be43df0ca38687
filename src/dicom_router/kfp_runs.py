"""Kubeflow Pipelines, driver side: build and compile the pipelines, run them with ``kfp.local`` on this
machine, or submit them to a Kubeflow endpoint. The steps themselves are ``dicom_router.steps``."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_router.config import REPO_ROOT, Settings
from dicom_router.deployment import Resources, component_image
from dicom_router.steps import MANIFEST_FILE

COMPILED_DIR = REPO_ROOT / "pipelines" / "compiled"

log = logging.getLogger(__name__)

PIPELINES: dict[str, str] = {"training": "pipelines.training", "drift": "pipelines.drift"}
"""Pipeline name → the module whose ``build(base_image, resources)`` returns the ``@dsl.pipeline``."""


def build_pipeline(name: str, settings: Settings, resources: Resources | None = None) -> Any:
    """The ``@dsl.pipeline`` called ``name``, its components on this version's image."""
    if name not in PIPELINES:
        raise KeyError(f"no pipeline {name!r}; known: {', '.join(PIPELINES)}")
    module = importlib.import_module(PIPELINES[name])
    return module.build(component_image(settings.k8s_image_registry), resources or Resources())


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


def _log_tail(log_file: Path, lines: int = 60) -> str:
    """The end of a failed run's task logs, without kfp.local's colours: where the failing task's
    traceback is (kfp's own error names only the task)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log_file.read_text(errors="replace"))
    return f"last {lines} lines of the task logs ({log_file}):\n" + "\n".join(text.splitlines()[-lines:])


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
        try:
            task = pipeline_func(**dict(params))
        except RuntimeError as failed:
            if log_file is None:  # the task logs went to stdout, where the user sees them
                raise
            sys.stdout.flush()
            raise RuntimeError(f"{failed}\n{_log_tail(log_file)}") from failed
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
