"""MLflow: candidate runs, the registered model ``bodypart-router``, the promotion gate and its history.

The embedded default is SQLite with artifacts in ``data_dir/mlflow``; a tracking server URI works the
same. Every gate decision, promotion request, approval, rejection and shadow deployment is written on
the model version (tags) and as one run of the ``bodypart-router-promotions`` experiment, an
append-only log that answers "which model was in production when, who approved it, on what evidence"
from any client of the tracking server. A request's state is read from that log (a later run naming
it approves or rejects it), never updated in place.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from dicom_router import LABELS
from dicom_router.config import Settings
from dicom_router.errors import ModelNotFound
from dicom_router.inference import Bundle, bundle_at

log = logging.getLogger(__name__)

CANDIDATES_EXPERIMENT = "bodypart-router-candidates"
PROMOTIONS_EXPERIMENT = "bodypart-router-promotions"
CHAMPION = "champion"
CHALLENGER = "challenger"
ACTIONS = ("gate", "request", "approve", "reject", "shadow")
"""What a history entry records (``action``); entries written before it existed are ``gate``."""


class RequestError(ValueError):
    """A promotion request that cannot be approved or rejected (unknown, already decided, stale)."""


def connect(settings: Settings) -> MlflowClient:
    """Point MLflow at the deployment's tracking store (creating the local one on first use)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if settings.mlflow_tracking_uri is None:
        (settings.data_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    return MlflowClient()


def experiment(settings: Settings, name: str) -> str:
    """Experiment id; local stores keep artifacts under ``data_dir/mlflow/artifacts``, not the cwd."""
    client = connect(settings)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if settings.mlflow_tracking_uri is None:
        location = (settings.data_dir / "mlflow" / "artifacts" / name).as_uri()
    return str(client.create_experiment(name, artifact_location=location))


# --- resolving MODEL_URI ----------------------------------------------------------------------------


def model_version(settings: Settings, uri: str) -> ModelVersion:
    """``models:/name@alias`` or ``models:/name/version`` → the registry's model version."""
    client = connect(settings)
    spec = uri.removeprefix("models:/")
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = spec.partition("/")
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as exc:
        raise ModelNotFound(
            f"{uri}: no such model version or alias in {settings.tracking_uri} ({exc.message})"
        ) from None


def load_bundle(settings: Settings, uri: str) -> Bundle:
    """A MODEL_URI (MLflow URI, ``s3://`` or local bundle directory) → a runnable bundle."""
    if not uri.startswith("models:/"):
        return bundle_at(uri, settings)
    version = model_version(settings, uri)
    target = settings.data_dir / "models" / version.name / str(version.version)
    if not (target / "model.onnx").is_file():
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(target)
        )
    return Bundle(target, name=version.name, version=str(version.version))


# --- registering a candidate -----------------------------------------------------------------------


def register_bundle(settings: Settings, run_id: str, tags: dict[str, str]) -> ModelVersion:
    """Register the run's ``bundle`` artifact as a new version of the model, tagged ``candidate``."""
    client = connect(settings)
    version = mlflow.register_model(f"runs:/{run_id}/bundle", settings.registered_model)
    for key, value in {"role": "candidate", **tags}.items():
        client.set_model_version_tag(settings.registered_model, version.version, key, value)
    log.info("registered %s version %s (candidate)", settings.registered_model, version.version)
    return version


# --- the promotion gate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    version: str
    macro_f1: float
    recall: dict[str, float]


def decide(candidate: Scores, champion: Scores | None, *, margin: float, floor: float) -> tuple[bool, str]:
    """The gate, as a pure rule: higher macro-F1 and no class's recall down by more than ``margin``;
    the first model needs macro-F1 >= ``floor``."""
    if champion is None:
        if candidate.macro_f1 >= floor:
            return True, f"first model: macro-F1 {candidate.macro_f1:.4f} >= floor {floor:.2f}"
        return False, f"first model: macro-F1 {candidate.macro_f1:.4f} below the floor {floor:.2f}"
    if candidate.macro_f1 <= champion.macro_f1:
        return False, (
            f"macro-F1 {candidate.macro_f1:.4f} not above the champion's {champion.macro_f1:.4f} "
            f"(version {champion.version})"
        )
    drops = {
        label: champion.recall[label] - candidate.recall[label]
        for label in LABELS
        if champion.recall[label] - candidate.recall[label] > margin + 1e-12
    }
    if drops:
        worst = ", ".join(f"{label} -{drop:.4f}" for label, drop in sorted(drops.items()))
        return False, f"recall drops by more than {margin:.2f}: {worst}"
    return True, (
        f"macro-F1 {candidate.macro_f1:.4f} > champion's {champion.macro_f1:.4f} (version "
        f"{champion.version}); no class recall down by more than {margin:.2f}"
    )


def scores_from_report(version: str, report: dict[str, Any]) -> Scores:
    return Scores(
        version,
        float(report["macro_f1"]),
        {label: float(report["per_class"][label]["recall"]) for label in LABELS},
    )


def newest_candidate(settings: Settings) -> ModelVersion:
    client = connect(settings)
    versions = client.search_model_versions(f"name = '{settings.registered_model}'")
    candidates = [v for v in versions if v.tags.get("role") == "candidate"]
    if not candidates:
        raise ModelNotFound(f"no candidate version of {settings.registered_model} is registered")
    return max(candidates, key=lambda v: int(v.version))


def champion_version(settings: Settings) -> ModelVersion | None:
    client = connect(settings)
    try:
        return client.get_model_version_by_alias(settings.registered_model, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def record_decision(settings: Settings, version: str, decision: dict[str, Any], promoted: bool) -> None:
    """Tags on the version, the alias when promoted, and one run in the append-only history."""
    client = connect(settings)
    name = settings.registered_model
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    action = str(decision.get("action", "gate"))
    prefix = "gate" if action == "gate" else "approval"
    verdict = {"gate": "promoted" if promoted else "refused", "approve": "approved", "reject": "rejected"}
    client.set_model_version_tag(name, version, f"{prefix}.decision", verdict.get(action, action))
    client.set_model_version_tag(name, version, f"{prefix}.reason", decision["reason"])
    client.set_model_version_tag(name, version, f"{prefix}.at", decision["at"])
    for key in ("reviewer", "request"):
        if decision.get(key):
            client.set_model_version_tag(name, version, f"{prefix}.{key}", str(decision[key]))
    append_history(settings, version, decision)
    log.info("%s version %s %s: %s", name, version, verdict.get(action, action), decision["reason"])


def append_history(settings: Settings, version: str, decision: dict[str, Any]) -> str:
    """One run of the promotions experiment holding ``decision``; returns the run id. A request is
    named by its run (the first 12 characters of the id), written into its document here."""
    connect(settings)
    with mlflow.start_run(
        experiment_id=experiment(settings, PROMOTIONS_EXPERIMENT), run_name=f"v{version}"
    ) as run:
        if decision.get("action") == "request":
            decision = {**decision, "request": str(run.info.run_id)[:12]}
        tags = {"decision": json.dumps(decision), "promoted": str(decision["promoted"]), "version": version}
        tags["action"] = str(decision.get("action", "gate"))
        if decision.get("request"):
            tags["request"] = str(decision["request"])
        mlflow.set_tags(tags)
        mlflow.log_dict(decision, "decision.json")
        return str(run.info.run_id)


def record_request(settings: Settings, version: str, decision: dict[str, Any]) -> str:
    """File a promotion request for ``version`` with the gate's figures; its id (what ``--approve``
    takes) is the first 12 characters of its history run."""
    request = append_history(settings, version, {**decision, "action": "request"})[:12]
    client = connect(settings)
    name = settings.registered_model
    client.set_model_version_tag(name, version, "approval.decision", "requested")
    client.set_model_version_tag(name, version, "approval.request", request)
    log.info("%s version %s: promotion requested (%s); awaiting approval", name, version, request)
    return request


def pending_request(settings: Settings, request: str) -> dict[str, Any]:
    """The request's document, if nobody approved or rejected it yet."""
    client = connect(settings)
    found = client.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
    runs = (
        []
        if found is None
        else client.search_runs([found.experiment_id], f"tags.request = '{request}'", max_results=1000)
    )
    documents = [json.loads(run.data.tags["decision"]) for run in runs if "decision" in run.data.tags]
    filed = [d for d in documents if d.get("action") == "request"]
    if not filed:
        raise RequestError(f"no promotion request {request!r} (see promote --history)")
    decided = [d for d in documents if d.get("action") in ("approve", "reject")]
    if decided:
        raise RequestError(
            f"request {request} was already {decided[0]['action']}d by {decided[0].get('reviewer')}"
        )
    return dict(filed[0])


def set_challenger(settings: Settings, version: str, decision: dict[str, Any]) -> None:
    """Put ``version`` in shadow: alias ``challenger``, recorded in the history."""
    client = connect(settings)
    client.set_registered_model_alias(settings.registered_model, CHALLENGER, version)
    client.set_model_version_tag(settings.registered_model, version, "shadow.at", decision["at"])
    append_history(settings, version, decision)
    log.info("%s version %s in shadow (alias %s)", settings.registered_model, version, CHALLENGER)


def history(settings: Settings) -> list[dict[str, Any]]:
    """Every gate decision, request, approval, rejection and shadow deployment, oldest first."""
    client = connect(settings)
    found = client.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id], order_by=["attributes.start_time ASC"], max_results=50_000
    )
    return [
        {"action": "gate", **json.loads(run.data.tags["decision"])}
        for run in runs
        if "decision" in run.data.tags
    ]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def decision_document(
    promoted: bool, candidate: Scores, champion: Scores | None, reason: str, *, forced: bool = False
) -> dict[str, Any]:
    """The contract's ``promote`` JSON (plus ``at`` and ``forced``)."""
    return {
        "promoted": promoted,
        "candidate": asdict(candidate),
        "champion": asdict(champion) if champion else None,
        "reason": reason,
        "forced": forced,
        "at": now(),
    }
