"""Preprocess once, train one candidate per task, evaluate them together and keep the best."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_router.config import Settings
from dicom_router.steps import CACHE_MANIFEST, CANDIDATE_FILE, CATALOG_FILE

if TYPE_CHECKING:  # the training code (torch) loads only in the steps that train
    from dicom_router.train import TrainConfig

log = logging.getLogger(__name__)


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
    cv_by: str = "",
    cv_folds: int = 3,
) -> dict[str, Any]:
    """One candidate on the catalog's persisted split: an architecture, or an ensemble ``a+b`` whose
    members train here one after the other (an MLflow run each, and one for the ensemble). Its bundle
    goes to ``model_dir`` with ``candidate.json`` (run id, test metrics) beside it. With ``cv_by`` (a
    catalog column, e.g. ``site_id``) a ``cv_folds``-fold cross-validation grouped by it runs first,
    as ``train --cv-by`` does: its temperature and 99% review threshold go into the bundle's card, so
    the router's ``below_confidence: model`` holds the candidate to what it did at unseen sites."""
    import mlflow

    from dicom_router.candidates import (
        calibration_of,
        cross_validate_for_rules,
        load_labelled,
        train_candidates,
    )

    manifest = json.loads((Path(cache_dir) / CACHE_MANIFEST).read_text())
    settings = settings.model_copy(update={"cache_uri": manifest["cache_uri"]})
    labelled = load_labelled(settings, catalog=f"{catalog_dir}/{CATALOG_FILE}")
    configs = _recipe_configs(
        recipe, arch, epochs=epochs, image_size=image_size, batch_size=batch_size, seed=seed
    )
    cv = (
        cross_validate_for_rules(
            settings, labelled, configs, group_by=cv_by, folds=cv_folds, seed=seed, progress=False
        )
        if cv_by
        else {}
    )
    candidates, _ = train_candidates(
        settings,
        labelled,
        configs,
        register=False,
        ensemble=True,
        tta=tta,
        calibration=calibration_of(cv),
        seed=seed,
        progress=False,
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
