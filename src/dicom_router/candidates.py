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
from mlflow.models import infer_signature

from dicom_router import LABELS
from dicom_router.catalog import ingest, read_catalog
from dicom_router.config import Settings
from dicom_router.data import CachedImages, Split, build_cache, split_examples
from dicom_router.dicom.errors import DicomInputError
from dicom_router.evaluate import evaluation_report, plot_confusion_matrix, plot_reliability
from dicom_router.inference import METADATA_FEATURES, Bundle, PreprocessConfig
from dicom_router.models import export_bundle
from dicom_router.registry import CANDIDATES_EXPERIMENT, experiment, register_bundle
from dicom_router.train import TrainConfig, train_candidate

log = logging.getLogger(__name__)


@dataclass
class Labelled:
    """Labelled, decodable-looking instances (catalog rows) and the source their keys are relative to."""

    frame: pd.DataFrame
    source: str

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


def _save_bundle(export: Path, out: Path, preprocess: PreprocessConfig) -> None:
    """The bundle as an MLflow ONNX model (MLmodel, signature, input example) plus the contract's files."""
    size = preprocess.image_size
    example: dict[str, np.ndarray] = {
        "image": np.random.default_rng(0).random((2, 1, size, size), np.float32)
    }
    if preprocess.metadata:
        example["meta"] = np.zeros((2, len(METADATA_FEATURES)), np.float32)
    probabilities, embedding = Bundle(export).run(example["image"], example.get("meta"))
    mlflow.onnx.save_model(
        onnx.load(str(export / "model.onnx")),
        str(out),
        signature=infer_signature(example, {"probabilities": probabilities, "embedding": embedding}),
        input_example=example,
    )
    for name in ("labels.json", "preprocess.json", "card.json"):
        shutil.copy(export / name, out / name)


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
        cached, bad = build_cache(
            labelled.frame,
            labelled.source,
            PreprocessConfig(image_size=config.image_size),
            settings,
            progress=progress,
        )
        errors.extend(e for e in bad if e.path not in {x.path for x in errors})
        parts = {name: cached.select(split.of(name)) for name in ("train", "val", "test")}
        preprocess = PreprocessConfig(image_size=config.image_size, metadata=config.metadata)
        name = config.arch + ("+meta" if config.metadata else "")
        with (
            mlflow.start_run(experiment_id=experiment_id, run_name=name) as run,
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
                config, parts["train"], parts["val"], work / "best.pt", on_epoch=_log_epoch, progress=progress
            )
            card = {**facts, "best_epoch": result.best_epoch, "test_items": items}
            export = export_bundle(result.net, preprocess, card, work / "export")
            report, probabilities = score_cached(Bundle(export), parts["test"])
            card["test_metrics"] = {k: report[k] for k in ("n", "accuracy", "macro_f1", "weighted_f1", "ece")}
            (export / "card.json").write_text(json.dumps({"arch": config.arch, **card}, indent=2))
            _save_bundle(export, work / "bundle", preprocess)
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
                name,
                report["macro_f1"],
                report["n"],
                f", registered as version {version}" if version else "",
            )
            results.append(Candidate(config, run.info.run_id, version, report))
    return results, errors
