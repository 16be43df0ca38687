"""Training candidates end to end: labelled data → split → cache → train → bundle → evaluation on the
persisted test split → one MLflow run each → registered version tagged ``candidate``."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.onnx
import numpy as np
import numpy.typing as npt
import onnx
import pandas as pd
import torch
from mlflow.models import infer_signature

from dicom_router import LABELS
from dicom_router.catalog import ingest, read_catalog
from dicom_router.config import Settings
from dicom_router.data import CachedImages, Split, build_cache, grouped_folds, split_examples
from dicom_router.dicom.errors import DicomInputError
from dicom_router.evaluate import evaluation_report, plot_confusion_matrix, plot_reliability
from dicom_router.inference import METADATA_FEATURES, Bundle, PreprocessConfig
from dicom_router.models import export_bundle
from dicom_router.registry import CANDIDATES_EXPERIMENT, experiment, register_bundle
from dicom_router.synth import PROFILES, synthesize
from dicom_router.train import TrainConfig, predict_probabilities, train_candidate

log = logging.getLogger(__name__)


@dataclass
class Labelled:
    """Labelled, decodable-looking instances (catalog rows) and the source their keys are relative to."""

    frame: pd.DataFrame
    source: str

    def cached(
        self, settings: Settings, preprocess: PreprocessConfig, *, progress: bool = True
    ) -> tuple[CachedImages, list[DicomInputError]]:
        """The preprocessed images (decoded once, then read from the cache)."""
        return build_cache(self.frame, self.source, preprocess, settings, progress=progress)

    @property
    def fingerprint(self) -> str:
        """Which instances with which labels: the training data's identity, recorded with each model."""
        rows = sorted(zip(self.frame["sop_uid_hash"], self.frame["label"], strict=True))
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def load_labelled(settings: Settings, *, catalog: str | None = None, data: str | None = None) -> Labelled:
    """From a catalog (``ingest --labels`` output) or a labelled folder (cataloged on the fly)."""
    if catalog is not None:
        frame, source = read_catalog(catalog, settings)
    elif data is not None:
        with tempfile.TemporaryDirectory() as tmp:
            result = ingest(
                data,
                f"{tmp}/catalog.parquet",
                settings,
                labels_uri=f"{data.rstrip('/')}/labels.csv",
                progress=False,
            )
        frame, source = result.catalog, data
    else:
        raise ValueError("give a catalog or a labelled data folder")
    usable = frame[frame["label"].notna() & frame["has_pixels"]].reset_index(drop=True)
    if usable.empty:
        raise ValueError(f"no labelled images with pixel data in {catalog or data}")
    return Labelled(usable, source)


@dataclass
class Candidate:
    config: TrainConfig
    run_id: str
    version: str | None
    report: dict[str, Any]


def _log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics, step=epoch)


def test_items(labelled: Labelled, split: Split) -> list[dict[str, str]]:
    """The persisted test split: enough to find and re-score exactly these instances later."""
    test = set(split.of("test"))
    rows = labelled.frame[labelled.frame["sop_uid_hash"].isin(test)]
    return [
        {"key": str(k), "label": str(label), "sop_uid_hash": str(h)}
        for k, label, h in zip(rows["key"], rows["label"], rows["sop_uid_hash"], strict=True)
    ]


def score_cached(bundle: Bundle, cached: CachedImages) -> tuple[dict[str, Any], npt.NDArray[np.float32]]:
    """Evaluate the exported bundle (ONNX Runtime, the serving path) on cached preprocessed images."""
    images = cached.images.astype(np.float32)[:, None] / 65535.0
    start = time.perf_counter()
    probabilities, _ = bundle.run(images, cached.meta)
    ms = (time.perf_counter() - start) * 1000.0 / max(len(images), 1)
    return evaluation_report(cached.labels, probabilities, LABELS, ms_per_image=ms), probabilities


def save_bundle(bundle: Bundle, out: Path) -> None:
    """The bundle as an MLflow ONNX model (MLmodel, signature, input example) plus the contract's files."""
    preprocess = bundle.preprocess
    size = preprocess.image_size
    example: dict[str, np.ndarray] = {
        "image": np.random.default_rng(0).random((2, 1, size, size), np.float32)
    }
    if preprocess.metadata:
        example["meta"] = np.zeros((2, len(METADATA_FEATURES)), np.float32)
    probabilities, embedding = bundle.run(example["image"], example.get("meta"))
    mlflow.onnx.save_model(
        onnx.load(str(bundle.path / "model.onnx")),
        str(out),
        signature=infer_signature(example, {"probabilities": probabilities, "embedding": embedding}),
        input_example=example,
    )
    for name in ("labels.json", "preprocess.json", "card.json"):
        shutil.copy(bundle.path / name, out / name)


def train_candidates(
    settings: Settings,
    labelled: Labelled,
    configs: list[TrainConfig],
    *,
    register: bool,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[Candidate], list[DicomInputError]]:
    """Train each configuration on one shared split and cache; log, export and (optionally) register."""
    split = split_examples(labelled.frame, seed=seed)
    experiment_id = experiment(settings, CANDIDATES_EXPERIMENT)
    items = test_items(labelled, split)
    results: list[Candidate] = []
    errors: list[DicomInputError] = []
    for config in configs:
        cached, bad = labelled.cached(settings, config.preprocess, progress=progress)
        errors.extend(e for e in bad if e.path not in {x.path for x in errors})
        parts = {name: cached.select(split.of(name)) for name in ("train", "val", "test")}
        preprocess = config.preprocess
        with (
            mlflow.start_run(experiment_id=experiment_id, run_name=config.name) as run,
            tempfile.TemporaryDirectory() as tmp,
        ):
            work = Path(tmp)
            mlflow.log_params(config.model_dump())
            facts = {
                "data_fingerprint": labelled.fingerprint,
                "split_fingerprint": split.fingerprint,
                "source": labelled.source,
                **{f"n_{part}": len(images.keys) for part, images in parts.items()},
            }
            mlflow.log_params(facts)
            mlflow.log_dict(json.loads(split.to_json()), "split.json")
            result = train_candidate(
                config,
                parts["train"],
                parts["val"],
                work / "best.pt",
                on_epoch=_log_epoch,
                progress=progress,
                backbone_state=synthetic_backbone(settings, config, progress=progress),
            )
            card = {**facts, "best_epoch": result.best_epoch, "test_items": items}
            export = export_bundle(result.net, preprocess, card, work / "export")
            bundle = Bundle(export)
            report, probabilities = score_cached(bundle, parts["test"])
            card["test_metrics"] = {k: report[k] for k in ("n", "accuracy", "macro_f1", "weighted_f1", "ece")}
            (export / "card.json").write_text(json.dumps({"arch": config.arch, **card}, indent=2))
            save_bundle(bundle, work / "bundle")
            mlflow.log_artifacts(str(work / "bundle"), "bundle")
            mlflow.log_dict(report, "evaluation.json")
            mlflow.log_metrics(
                {
                    "test_macro_f1": report["macro_f1"],
                    "test_accuracy": report["accuracy"],
                    "test_ece": report["ece"],
                    "best_val_macro_f1": result.best_val_macro_f1,
                    "train_images_per_second": result.images_per_second,
                    "ms_per_image": report["ms_per_image"],
                    **{f"test_recall_{label}": report["per_class"][label]["recall"] for label in LABELS},
                }
            )
            cm = np.asarray(report["confusion_matrix"])
            mlflow.log_artifact(str(plot_confusion_matrix(cm, LABELS, work / "confusion_matrix.png")))
            mlflow.log_artifact(
                str(plot_reliability(probabilities, parts["test"].labels, work / "reliability.png"))
            )
            version = None
            if register:
                tags = {
                    "arch": config.arch,
                    "metadata": str(config.metadata),
                    "test_macro_f1": f"{report['macro_f1']:.4f}",
                    "split_fingerprint": split.fingerprint,
                    "data_fingerprint": labelled.fingerprint,
                }
                version = str(register_bundle(settings, run.info.run_id, tags).version)
            log.info(
                "%s: test macro-F1 %.4f (n=%d)%s",
                config.name,
                report["macro_f1"],
                report["n"],
                f", registered as version {version}" if version else "",
            )
            results.append(Candidate(config, run.info.run_id, version, report))
    return results, errors


def synthetic_backbone(
    settings: Settings, config: TrainConfig, *, progress: bool = True
) -> dict[str, Any] | None:
    """Backbone weights pretrained on ``config.pretrain_synthetic`` synthetic images from all site
    profiles (kept on disk, so CV folds and the final model share one pretraining)."""
    if not config.pretrain_synthetic:
        return None
    tag = (
        "-".join(
            (
                config.arch,
                config.preprocess.fingerprint(),
                f"n{config.pretrain_synthetic}",
                f"e{config.pretrain_epochs}",
            )
        )
        + f"-{config.seed}"
    )
    weights = settings.data_dir / "pretrained" / f"{tag}.pt"
    if weights.is_file():
        state: dict[str, Any] = torch.load(weights, map_location="cpu")
        return state
    folder = settings.data_dir / "pretrained" / f"synthetic-n{config.pretrain_synthetic}-{config.seed}"
    if not (folder / "labels.csv").is_file():
        synthesize(
            folder,
            config.pretrain_synthetic,
            sites=len(PROFILES),
            seed=10_000 + config.seed,
            long_side_px=max(2 * config.image_size, 128),
            progress=progress,
        )
    labelled = load_labelled(settings, data=str(folder))
    cached, _ = labelled.cached(settings, config.preprocess, progress=progress)
    split = split_examples(labelled.frame, seed=config.seed)
    pre = config.model_copy(
        update={"epochs": config.pretrain_epochs, "metadata": False, "pretrain_synthetic": 0}
    )
    result = train_candidate(
        pre,
        cached.select(split.of("train") + split.of("test")),
        cached.select(split.of("val")),
        weights.with_suffix(".ckpt"),
        progress=progress,
    )
    log.info(
        "pretrained %s on %d synthetic images: val macro-F1 %.4f",
        config.arch,
        len(cached.keys),
        result.best_val_macro_f1,
    )
    state = result.net.backbone.state_dict()
    torch.save(state, weights)
    weights.with_suffix(".ckpt").unlink(missing_ok=True)
    return state


def cross_validate(
    settings: Settings,
    labelled: Labelled,
    config: TrainConfig,
    *,
    group_by: str,
    folds: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Group-wise cross-validation (e.g. by public collection): every image is tested once by a model
    that never saw its group; the pooled predictions give the report, logged as one MLflow run."""
    if group_by not in labelled.frame.columns:
        raise ValueError(f"no column {group_by!r} in the labelled data (labels.csv carries extra columns)")
    cached, _ = labelled.cached(settings, config.preprocess, progress=progress)
    frame = labelled.frame[labelled.frame["sop_uid_hash"].isin(cached.keys)]
    assignment = grouped_folds(frame, group_by, folds, seed=seed)
    truth: list[np.ndarray] = []
    pooled: list[np.ndarray] = []
    with (
        mlflow.start_run(
            experiment_id=experiment(settings, CANDIDATES_EXPERIMENT), run_name=f"cv-{group_by}-{config.name}"
        ),
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.log_params({**config.model_dump(), "cv_group_by": group_by, "cv_folds": folds})
        mlflow.log_param("data_fingerprint", labelled.fingerprint)
        for fold in range(folds):
            test_keys = [k for k, f in assignment.items() if f == fold]
            rest = frame[~frame["sop_uid_hash"].isin(test_keys)]
            inner = split_examples(rest, seed=seed + fold, fractions=(0.85, 0.15, 0.0))
            train_keys = [k for k, s in inner.assignment.items() if s != "val"]
            result = train_candidate(
                config.model_copy(update={"seed": seed + fold}),
                cached.select(train_keys),
                cached.select(inner.of("val")),
                Path(tmp) / f"fold{fold}.pt",
                progress=progress,
                backbone_state=synthetic_backbone(settings, config, progress=progress),
            )
            test = cached.select(test_keys)
            probabilities = predict_probabilities(result.net, test)
            fold_f1 = evaluation_report(test.labels, probabilities, LABELS, 0.0, resamples=200)["macro_f1"]
            mlflow.log_metric("fold_macro_f1", fold_f1, step=fold)
            log.info(
                "cv fold %d/%d (%d test images): macro-F1 %.4f", fold + 1, folds, len(test.keys), fold_f1
            )
            truth.append(test.labels)
            pooled.append(probabilities)
        report = evaluation_report(np.concatenate(truth), np.concatenate(pooled), LABELS, 0.0)
        mlflow.log_dict(report, "cv_evaluation.json")
        mlflow.log_metrics(
            {
                "cv_macro_f1": report["macro_f1"],
                "cv_accuracy": report["accuracy"],
                **{f"cv_recall_{label}": report["per_class"][label]["recall"] for label in LABELS},
                **{f"cv_f1_{label}": report["per_class"][label]["f1"] for label in LABELS},
            }
        )
        cm = np.asarray(report["confusion_matrix"])
        mlflow.log_artifact(str(plot_confusion_matrix(cm, LABELS, Path(tmp) / "cv_confusion_matrix.png")))
    return report
