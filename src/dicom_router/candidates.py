"""Training candidates end to end: labelled data → split → cache → train → calibrate → bundle →
evaluation on the persisted test split → one MLflow run each → registered version tagged ``candidate``;
and source-grouped cross-validation of members, ensembles and test-time augmentation."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
from dicom_router.calibration import (
    abstention_report,
    familiar_mask,
    fit_temperature,
    scaled,
    threshold_for,
)
from dicom_router.catalog import ingest, read_catalog
from dicom_router.config import Settings
from dicom_router.data import (
    CachedImages,
    Split,
    build_cache,
    cv_folds,
    split_examples,
)
from dicom_router.dicom.errors import DicomInputError
from dicom_router.evaluate import (
    confusion_matrix,
    evaluation_report,
    group_report,
    macro_f1,
    plot_confusion_matrix,
    plot_reliability,
    plot_risk_coverage,
)
from dicom_router.inference import METADATA_FEATURES, Bundle, PreprocessConfig
from dicom_router.models import BodyPartNet, Scorer, export_bundle
from dicom_router.novelty import Novelty, fit_novelty, novelty_of
from dicom_router.registry import CANDIDATES_EXPERIMENT, experiment, register_bundle
from dicom_router.report.render import write_frame_report
from dicom_router.routing.rules import EXAMPLE_RULES, Review, RoutingRules
from dicom_router.synth import PROFILES, synthesize
from dicom_router.train import TrainConfig, predict_scores, train_candidate
from dicom_router.weights import Weights, resolve

log = logging.getLogger(__name__)


@dataclass
class Labelled:
    """Labelled, decodable-looking instances (catalog rows) and the source their keys are relative to."""

    frame: pd.DataFrame
    source: str
    catalog: str | None = None
    """The catalog the frame came from (None: folders cataloged on the fly)."""

    def cached(
        self, settings: Settings, preprocess: PreprocessConfig, *, progress: bool = True
    ) -> tuple[CachedImages, list[DicomInputError]]:
        """The preprocessed images (decoded once, then read from the cache)."""
        return build_cache(self.frame, self.source, preprocess, settings, progress=progress)

    def reviewed_by_site(self, sop_hashes: Sequence[str]) -> dict[str, int]:
        """How many of these instances carry a reviewer's label (``label_source=review``), by site."""
        if "label_source" not in self.frame.columns:
            return {}
        chosen = self.frame[
            self.frame["sop_uid_hash"].isin(set(sop_hashes)) & (self.frame["label_source"] == "review")
        ]
        return {str(k): int(v) for k, v in Counter(chosen["site_id"].fillna("(none)")).items()}

    @property
    def fingerprint(self) -> str:
        """Which instances with which labels: the training data's identity, recorded with each model."""
        rows = sorted(zip(self.frame["sop_uid_hash"], self.frame["label"], strict=True))
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _root(uris: Sequence[str]) -> str:
    """The longest common folder of several sources (local paths made absolute first)."""
    full = [u.rstrip("/") if "://" in u else str(Path(u).resolve()) for u in uris]
    common: list[str] = []
    for segments in zip(*(u.split("/") for u in full), strict=False):
        if len(set(segments)) != 1:
            break
        common.append(segments[0])
    root = "/".join(common) or ("/" if full[0].startswith("/") else "")
    if not root or root.endswith(":") or root.endswith(":/"):
        raise ValueError(f"labelled folders {list(uris)} share no common parent folder or bucket")
    return root


def _catalog_folder(settings: Settings, data: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest(
            data,
            f"{tmp}/catalog.parquet",
            settings,
            labels_uri=f"{data.rstrip('/')}/labels.csv",
            progress=False,
        )
    return result.catalog


def load_labelled(
    settings: Settings,
    *,
    catalog: str | None = None,
    data: Sequence[str] = (),
    collections: Path | None = None,
) -> Labelled:
    """From a catalog (``ingest --labels`` output) or labelled folders (cataloged on the fly; several
    folders become one set whose keys are relative to their common parent).

    ``collections`` (CSV ``source,collection``) names the collection each source belongs to, for
    cross-validation folds grouped by collection across folders (two folders may hold images of one
    public collection under different source names); without it a source is its own collection.
    """
    if catalog is not None:
        frame, source = read_catalog(catalog, settings)
    elif len(data) == 1:
        frame, source = _catalog_folder(settings, data[0]), data[0]
    elif data:
        source = _root(data)
        parts = []
        for folder in data:
            part = _catalog_folder(settings, folder)
            prefix = _root([folder]).removeprefix(source).strip("/")
            parts.append(part.assign(key=prefix + "/" + part["key"].astype(str)))
        frame = pd.concat(parts, ignore_index=True)
    else:
        raise ValueError("give a catalog or a labelled data folder")
    usable = frame[frame["label"].notna() & frame["has_pixels"]].reset_index(drop=True)
    if usable.empty:
        raise ValueError(f"no labelled images with pixel data in {catalog or ', '.join(data)}")
    if "source" in usable.columns:
        mapping: dict[str, str] = {}
        if collections is not None:
            table = pd.read_csv(collections, dtype=str)
            mapping = dict(zip(table["source"], table["collection"], strict=True))
        usable["collection"] = [mapping.get(str(s), s) for s in usable["source"]]
    return Labelled(usable, source, catalog)


@dataclass
class Candidate:
    name: str
    metadata: bool
    run_id: str
    version: str | None
    report: dict[str, Any]


@dataclass(frozen=True)
class Variant:
    """How trained members are combined: which members, with flip test-time augmentation or not."""

    members: tuple[int, ...]
    flip: bool

    def name(self, configs: Sequence[TrainConfig]) -> str:
        return "+".join(configs[i].name for i in self.members) + ("+flip" if self.flip else "")


def variants(n: int, *, ensemble: bool, tta: bool) -> list[Variant]:
    """Each member alone and, when ``ensemble``, all together; with flips when ``tta``."""
    singles = [Variant((i,), tta) for i in range(n)]
    return singles + ([Variant(tuple(range(n)), tta)] if ensemble and n > 1 else [])


def all_variants(n: int) -> list[Variant]:
    """Every comparison cross-validation reports: single vs ensemble, without and with TTA."""
    return [v for flip in (False, True) for v in variants(n, ensemble=True, tta=flip)]


@dataclass
class MemberScores:
    """One trained member's log-probability scores and embeddings on a set of images, plain and
    flip-averaged."""

    plain: npt.NDArray[np.float32]
    tta: npt.NDArray[np.float32]
    plain_embedding: npt.NDArray[np.float32]
    tta_embedding: npt.NDArray[np.float32]

    @classmethod
    def of(cls, net: BodyPartNet, cached: CachedImages) -> MemberScores:
        """Two passes, the image and its mirror: flip TTA is their mean, as ``Scorer(flip=True)``."""
        plain, embedding = predict_scores(net, cached)
        mirrored, mirrored_embedding = predict_scores(net, cached, mirrored=True)
        return cls(
            plain,
            ((plain + mirrored) / 2).astype(np.float32),
            embedding,
            ((embedding + mirrored_embedding) / 2).astype(np.float32),
        )


def combine(
    variant: Variant, members: Sequence[MemberScores]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """A variant's scores and embedding from its members' (what ``Scorer`` computes in one graph)."""
    chosen = [members[i] for i in variant.members]
    scores = [m.tta if variant.flip else m.plain for m in chosen]
    embeddings = [m.tta_embedding if variant.flip else m.plain_embedding for m in chosen]
    out: npt.NDArray[np.float32] = np.mean(np.stack(scores), axis=0)
    return out, np.concatenate(embeddings, axis=1)


def _check_ensemble(configs: Sequence[TrainConfig]) -> PreprocessConfig:
    preprocess = {c.preprocess for c in configs}
    if len(preprocess) != 1:
        raise ValueError("ensemble members must share one preprocessing (image size, equalisation, fusion)")
    return configs[0].preprocess


def initial_weights(settings: Settings, config: TrainConfig) -> Weights | None:
    """ImageNet weights for ``config`` (``--pretrained`` / ``--init-weights``), or None from scratch."""
    if not (config.pretrained or config.init_weights):
        return None
    return resolve(config.arch, init=config.init_weights, weights_dir=settings.weights_dir)


def _log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics, step=epoch)


def test_items(labelled: Labelled, split: Split) -> list[dict[str, str]]:
    """The persisted test split: pseudonyms and labels only (object keys of hospital exports carry
    names and record numbers, and the card ships in every bundle); ``promotion.locate`` re-finds the
    keys by ``sop_uid_hash``."""
    test = set(split.of("test"))
    rows = labelled.frame[labelled.frame["sop_uid_hash"].isin(test)]
    return [
        {"sop_uid_hash": str(h), "label": str(label)}
        for label, h in zip(rows["label"], rows["sop_uid_hash"], strict=True)
    ]


def score_cached(bundle: Bundle, cached: CachedImages) -> tuple[dict[str, Any], npt.NDArray[np.float32]]:
    """Evaluate the exported bundle (ONNX Runtime, the serving path) on cached preprocessed images."""
    images = cached.images.astype(np.float32)[:, None] / 65535.0
    start = time.perf_counter()
    probabilities = bundle.run(images, cached.meta).probabilities
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
    scores = bundle.run(example["image"], example.get("meta"))
    outputs = {name: value for name, value in scores._asdict().items() if value is not None}
    mlflow.onnx.save_model(
        onnx.load(str(bundle.path / "model.onnx")),
        str(out),
        signature=infer_signature(example, outputs),
        input_example=example,
    )
    for name in ("labels.json", "preprocess.json", "card.json"):
        shutil.copy(bundle.path / name, out / name)


@dataclass
class _Shared:
    """What every candidate of one training run shares (``parts``: the split cached for the current
    member's preprocessing)."""

    settings: Settings
    labelled: Labelled
    split: Split
    parts: dict[str, CachedImages]
    experiment_id: str
    register: bool
    calibration: dict[str, dict[str, float]]
    """By candidate name, from cross-validation: ``temperature`` and ``review_threshold``."""
    data_report: Path
    """The archive report of the labelled set (``report``'s HTML, JSON and plots), logged with every
    candidate as ``data_report/``: each version says what it was trained on."""


def _publish(
    shared: _Shared,
    scorer: Scorer,
    preprocess: PreprocessConfig,
    params: dict[str, Any],
    card: dict[str, Any],
    work: Path,
) -> tuple[dict[str, Any], str | None]:
    """Calibrate (the temperature cross-validation found for this candidate, else one fitted on
    validation that may only soften), export the bundle, score it on the test split through ONNX
    Runtime, log bundle, metrics and plots to the active run and (optionally) register it."""
    calibration = shared.calibration.get(scorer.name, {})
    val_scores, val_embedding = predict_scores(scorer, shared.parts["val"])
    temperature = calibration.get("temperature")
    if temperature is None:
        temperature = fit_temperature(val_scores, shared.parts["val"].labels, bounds=(1.0, 20.0))
    scorer.temperature.fill_(temperature)
    train_embedding = predict_scores(scorer, shared.parts["train"])[1]
    scorer.novelty = Novelty(fit_novelty(train_embedding, shared.parts["train"].labels, val_embedding))
    facts = {
        "data_fingerprint": shared.labelled.fingerprint,
        "split_fingerprint": shared.split.fingerprint,
        "source": shared.labelled.source,
        **({"catalog": shared.labelled.catalog} if shared.labelled.catalog else {}),
        **{f"n_{part}": len(images.keys) for part, images in shared.parts.items()},
    }
    reviewed = shared.labelled.reviewed_by_site(shared.split.of("train"))
    facts["reviewed_labels"] = sum(reviewed.values())
    mlflow.log_dict(reviewed, "reviewed_sites.json")
    mlflow.log_params({**params, **facts, "temperature": f"{temperature:.4f}"})
    mlflow.log_param("temperature_from", "cross-validation" if "temperature" in calibration else "validation")
    mlflow.log_dict(json.loads(shared.split.to_json()), "split.json")
    mlflow.log_artifacts(str(shared.data_report), "data_report")
    threshold = calibration.get("review_threshold")
    card = {
        **facts,
        **card,
        **({"review_threshold": threshold} if threshold is not None else {}),
        "test_items": test_items(shared.labelled, shared.split),
    }
    export = export_bundle(scorer, preprocess, card, work / "export")
    bundle = Bundle(export)
    report, probabilities = score_cached(bundle, shared.parts["test"])
    card = json.loads((export / "card.json").read_text())
    card["test_metrics"] = {k: report[k] for k in ("n", "accuracy", "macro_f1", "weighted_f1", "ece")}
    (export / "card.json").write_text(json.dumps(card, indent=2))
    save_bundle(bundle, work / "bundle")
    mlflow.log_artifacts(str(work / "bundle"), "bundle")
    mlflow.log_dict(report, "evaluation.json")
    mlflow.log_metric("ms_per_image", report["ms_per_image"])
    _log_report("test", report, probabilities, shared.parts["test"].labels, work)
    version = None
    if shared.register:
        tags = {
            "arch": scorer.name,
            "metadata": str(preprocess.metadata),
            "test_macro_f1": f"{report['macro_f1']:.4f}",
            "split_fingerprint": shared.split.fingerprint,
            "data_fingerprint": shared.labelled.fingerprint,
        }
        version = str(register_bundle(shared.settings, mlflow.active_run().info.run_id, tags).version)  # type: ignore[union-attr]
    log.info(
        "%s: test macro-F1 %.4f (n=%d, temperature %.2f)%s",
        scorer.name,
        report["macro_f1"],
        report["n"],
        temperature,
        f", registered as version {version}" if version else "",
    )
    return report, version


def train_candidates(
    settings: Settings,
    labelled: Labelled,
    configs: list[TrainConfig],
    *,
    register: bool,
    ensemble: bool = False,
    tta: bool = False,
    calibration: dict[str, dict[str, float]] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[Candidate], list[DicomInputError]]:
    """Train each configuration on one shared split and cache, then publish each member (and, with
    ``ensemble``, all members as one bundle) as a candidate: one MLflow run each, optionally registered.

    ``calibration`` (by candidate name, from cross-validation: ``temperature``, ``review_threshold``)
    calibrates each bundle and goes into its card."""
    split = split_examples(labelled.frame, seed=seed)
    if ensemble:
        _check_ensemble(configs)
    data_report = Path(tempfile.mkdtemp(prefix="data-report-"))
    try:
        name = f"training set of {labelled.catalog or labelled.source}"
        write_frame_report(labelled.frame, settings, data_report, name=name)
        shared = _Shared(
            settings,
            labelled,
            split,
            {},
            experiment(settings, CANDIDATES_EXPERIMENT),
            register,
            calibration or {},
            data_report,
        )
        return _train_each(shared, configs, ensemble=ensemble, tta=tta, progress=progress)
    finally:
        shutil.rmtree(data_report, ignore_errors=True)


def _train_each(
    shared: _Shared, configs: list[TrainConfig], *, ensemble: bool, tta: bool, progress: bool
) -> tuple[list[Candidate], list[DicomInputError]]:
    """``train_candidates``' work: each member trained and published, then their ensemble."""
    settings, labelled, split = shared.settings, shared.labelled, shared.split
    errors: list[DicomInputError] = []
    results: list[Candidate] = []
    nets: list[BodyPartNet] = []
    members: list[dict[str, Any]] = []
    for config in configs:
        cached, bad = labelled.cached(settings, config.preprocess, progress=progress)
        errors.extend(e for e in bad if e.path not in {x.path for x in errors})
        parts = {name: cached.select(split.of(name)) for name in ("train", "val", "test")}
        shared = replace(shared, parts=parts)
        name = Variant((0,), tta).name([config])
        with (
            mlflow.start_run(experiment_id=shared.experiment_id, run_name=name) as run,
            tempfile.TemporaryDirectory() as tmp,
        ):
            init = initial_weights(settings, config)
            provenance = init.provenance() if init else {"init_source": "scratch"}
            result = train_candidate(
                config,
                shared.parts["train"],
                shared.parts["val"],
                Path(tmp) / "best.pt",
                on_epoch=_log_epoch,
                progress=progress,
                init=init,
                backbone_state=synthetic_backbone(settings, config, init, progress=progress),
                synthetic=mixed_synthetic(settings, config, progress=progress),
            )
            mlflow.log_metrics(
                {
                    "best_val_macro_f1": result.best_val_macro_f1,
                    "train_images_per_second": result.images_per_second,
                }
            )
            card = {"best_epoch": result.best_epoch, **provenance}
            scorer = Scorer([result.net], flip=tta)
            report, version = _publish(
                shared, scorer, config.preprocess, {**config.model_dump(), **provenance}, card, Path(tmp)
            )
            results.append(Candidate(name, config.metadata, run.info.run_id, version, report))
            nets.append(result.net)
            members.append({"arch": config.arch, "run_id": run.info.run_id, **provenance})
    if ensemble and len(configs) > 1:
        scorer = Scorer(nets, flip=tta)
        with (
            mlflow.start_run(experiment_id=shared.experiment_id, run_name=scorer.name) as run,
            tempfile.TemporaryDirectory() as tmp,
        ):
            params = {
                "members": ",".join(c.name for c in configs),
                "tta": tta,
                **{k: v for k, v in configs[0].model_dump().items() if k not in ("arch",)},
            }
            report, version = _publish(
                shared, scorer, configs[0].preprocess, params, {"members": members}, Path(tmp)
            )
            results.append(Candidate(scorer.name, configs[0].metadata, run.info.run_id, version, report))
    return results, errors


def _synthetic_archive(
    settings: Settings, config: TrainConfig, count: int, *, progress: bool
) -> tuple[pd.DataFrame, CachedImages]:
    """``count`` synthetic images from all site profiles (``config.synthetic_variety``: with the views
    real archives hold), rendered once into ``data_dir`` and preprocessed as ``config`` trains."""
    kind = "synthetic-variety" if config.synthetic_variety else "synthetic"
    folder = settings.data_dir / "pretrained" / f"{kind}-n{count}-{config.seed}"
    if not (folder / "labels.csv").is_file():
        synthesize(
            folder,
            count,
            sites=len(PROFILES),
            seed=10_000 + config.seed,
            long_side_px=max(2 * config.image_size, 128),
            variety=config.synthetic_variety,
            progress=progress,
        )
    labelled = load_labelled(settings, data=[str(folder)])
    cached, _ = labelled.cached(settings, config.preprocess, progress=progress)
    return labelled.frame, cached


def mixed_synthetic(settings: Settings, config: TrainConfig, *, progress: bool = True) -> CachedImages | None:
    """The ``config.mix_synthetic`` synthetic images to mix into its training set, if any."""
    if not config.mix_synthetic:
        return None
    return _synthetic_archive(settings, config, config.mix_synthetic, progress=progress)[1]


def synthetic_backbone(
    settings: Settings, config: TrainConfig, init: Weights | None, *, progress: bool = True
) -> dict[str, Any] | None:
    """Backbone weights pretrained on ``config.pretrain_synthetic`` synthetic images from all site
    profiles, starting from ``init`` (kept on disk, so CV folds and the final model share one
    pretraining)."""
    if not config.pretrain_synthetic:
        return None
    tag = (
        "-".join(
            (
                config.arch,
                config.preprocess.fingerprint(),
                f"n{config.pretrain_synthetic}",
                f"e{config.pretrain_epochs}",
                *(("variety",) if config.synthetic_variety else ()),
                *((f"init{init.sha256[:12]}",) if init else ()),
            )
        )
        + f"-{config.seed}"
    )
    weights = settings.data_dir / "pretrained" / f"{tag}.pt"
    if weights.is_file():
        state: dict[str, Any] = torch.load(weights, map_location="cpu")
        return state
    frame, cached = _synthetic_archive(settings, config, config.pretrain_synthetic, progress=progress)
    split = split_examples(frame, seed=config.seed)
    pre = config.model_copy(
        update={
            "epochs": config.pretrain_epochs,
            "metadata": False,
            "pretrain_synthetic": 0,
            "mix_synthetic": 0,
            "warmup_epochs": 0,
        }
    )
    result = train_candidate(
        pre,
        cached.select(split.of("train") + split.of("test")),
        cached.select(split.of("val")),
        weights.with_suffix(".ckpt"),
        progress=progress,
        init=init,
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


def cross_fitted(
    scores: Sequence[npt.NDArray[np.float32]], truth: Sequence[npt.NDArray[np.int64]]
) -> tuple[npt.NDArray[np.float64], list[float]]:
    """Pooled calibrated probabilities of cross-validation folds: fold k's scores divided by the
    temperature fitted on every other fold's (held-out, other-source) scores and labels.

    A temperature fitted on a fold's own validation images (same sources as its training) says nothing
    about a new hospital: the model is nearly always right there, and the fit sharpens the
    probabilities exactly where they should soften."""
    out, temperatures = [], []
    for k, fold in enumerate(scores):
        rest = [i for i in range(len(scores)) if i != k]
        temperature = (
            fit_temperature(
                np.concatenate([scores[i] for i in rest]), np.concatenate([truth[i] for i in rest])
            )
            if rest
            else 1.0
        )
        temperatures.append(temperature)
        out.append(scaled(fold, temperature))
    return np.concatenate(out), temperatures


def cross_validate(
    settings: Settings,
    labelled: Labelled,
    configs: Sequence[TrainConfig],
    *,
    group_by: str,
    folds: int | None = 3,
    seed: int = 0,
    review_threshold: float | None = None,
    above_novelty: float | None = Review().above_novelty,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Group-wise cross-validation (e.g. by public collection): every image is tested once by models
    that never saw its group. Each fold trains every member once; each variant (member alone or all
    together, without and with flip TTA) is temperature-scaled by cross-fitting (each fold's temperature
    is fitted on the other folds' held-out groups, so calibration too is judged on unseen sources). The
    pooled predictions give one report per variant (per-class, per-group, risk–coverage and the review
    threshold for 99% auto-routed accuracy, the temperature for the final model), logged as nested
    MLflow runs. ``folds=None``: one fold per group (leave one source out). ``review_threshold`` (the
    rules' ``review.below_confidence``) is reported beside the chosen one. Each fold's novelty is fitted
    on its own training images (scaled on its validation split), so images above ``above_novelty``
    (the rules' ``review.above_novelty``) go to review in every routing figure, as in the router."""
    if group_by not in labelled.frame.columns:
        raise ValueError(f"no column {group_by!r} in the labelled data (labels.csv carries extra columns)")
    preprocess = _check_ensemble(configs)
    cached, _ = labelled.cached(settings, preprocess, progress=progress)
    frame = labelled.frame[labelled.frame["sop_uid_hash"].isin(cached.keys)]
    assignment = cv_folds(frame, group_by, folds, seed=seed)
    n_folds = max(assignment.values()) + 1
    group_of = dict(
        zip(frame["sop_uid_hash"].astype(str), frame[group_by].fillna("(none)").astype(str), strict=True)
    )
    chosen = all_variants(len(configs))
    truth: list[npt.NDArray[np.int64]] = []
    groups: list[str] = []
    raw: dict[Variant, list[npt.NDArray[np.float32]]] = {v: [] for v in chosen}
    novelty: dict[Variant, list[npt.NDArray[np.float32]]] = {v: [] for v in chosen}
    label = "loo" if folds is None else str(folds)
    names = "+".join(c.name for c in configs)
    experiment_id = experiment(settings, CANDIDATES_EXPERIMENT)
    with (
        mlflow.start_run(experiment_id=experiment_id, run_name=f"cv-{group_by}-{label}-{names}"),
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.log_params(
            {**configs[0].model_dump(), "arch": names, "cv_group_by": group_by, "cv_folds": label}
        )
        mlflow.log_param("data_fingerprint", labelled.fingerprint)
        mixed = [
            mixed_synthetic(settings, config, progress=progress) for config in configs
        ]  # once, not per fold
        for fold in range(n_folds):
            test_keys = [k for k, f in assignment.items() if f == fold]
            rest = frame[~frame["sop_uid_hash"].isin(test_keys)]
            inner = split_examples(rest, seed=seed + fold, fractions=(0.85, 0.15, 0.0))
            train_keys = [k for k, s in inner.assignment.items() if s != "val"]
            train, val, test = (
                cached.select(train_keys),
                cached.select(inner.of("val")),
                cached.select(test_keys),
            )
            parts: dict[str, list[MemberScores]] = {"train": [], "val": [], "test": []}
            for config, synthetic in zip(configs, mixed, strict=True):
                init = initial_weights(settings, config)
                result = train_candidate(
                    config.model_copy(update={"seed": seed + fold}),
                    train,
                    val,
                    Path(tmp) / f"fold{fold}.pt",
                    progress=progress,
                    init=init,
                    backbone_state=synthetic_backbone(settings, config, init, progress=progress),
                    synthetic=synthetic,
                )
                for name, part in (("train", train), ("val", val), ("test", test)):
                    parts[name].append(MemberScores.of(result.net, part))
            for variant in chosen:
                test_scores, test_embedding = combine(variant, parts["test"])
                fit = fit_novelty(
                    combine(variant, parts["train"])[1], train.labels, combine(variant, parts["val"])[1]
                )
                raw[variant].append(test_scores)
                novelty[variant].append(novelty_of(fit, test_embedding))
            truth.append(test.labels)
            groups.extend(group_of[k] for k in test.keys)
            fold_f1 = macro_f1(confusion_matrix(test.labels, raw[chosen[-1]][-1].argmax(axis=1), len(LABELS)))
            mlflow.log_metric("fold_macro_f1", fold_f1, step=fold)
            log.info(
                "cv fold %d/%d (%d test images): macro-F1 %.4f", fold + 1, n_folds, len(test.keys), fold_f1
            )
        y = np.concatenate(truth)
        reports: dict[str, dict[str, Any]] = {}
        for variant in chosen:
            probabilities, temperatures = cross_fitted(raw[variant], truth)
            name = variant.name(configs)
            report = evaluation_report(y, probabilities, LABELS, 0.0)
            familiar = familiar_mask(np.concatenate(novelty[variant]), above_novelty)
            threshold = (
                threshold_for(probabilities, y, familiar=familiar)
                if review_threshold is None
                else review_threshold
            )
            report["abstention"] = abstention_report(probabilities, y, threshold=threshold, familiar=familiar)
            report["above_novelty"] = above_novelty
            report["per_group"] = group_report(
                groups, y, probabilities, LABELS, threshold=threshold, familiar=familiar
            )
            report["temperatures"] = temperatures
            report["temperature"] = fit_temperature(np.concatenate(raw[variant]), y)
            reports[name] = report
            with mlflow.start_run(
                experiment_id=experiment_id, run_name=f"cv-{group_by}-{label}-{name}", nested=True
            ):
                mlflow.log_dict(report, "cv_evaluation.json")
                _log_report("cv", report, probabilities, y, Path(tmp) / name, familiar)
        mlflow.log_dict({"variants": cv_table(reports)}, "cv_table.json")
    return reports


def cross_validate_for_rules(
    settings: Settings,
    labelled: Labelled,
    configs: Sequence[TrainConfig],
    *,
    group_by: str,
    folds: int | None = 3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """``cross_validate`` under the deployment's review rules (``DICOM_ROUTER_ROUTE_RULES``, else the
    example's): their novelty check, and their fixed review threshold reported beside the 99% one (with
    ``below_confidence: model`` the 99% one is what the trained model will bring)."""
    review = RoutingRules.load(settings.route_rules or EXAMPLE_RULES).review
    return cross_validate(
        settings,
        labelled,
        configs,
        group_by=group_by,
        folds=folds,
        seed=seed,
        review_threshold=review.fixed_threshold,
        above_novelty=review.above_novelty,
        progress=progress,
    )


def calibration_of(reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """What cross-validation hands the final models (``train_candidates(calibration=…)``), by variant:
    the cross-fitted temperature and the review threshold for 99% auto-routed accuracy."""
    return {
        name: {"temperature": r["temperature"], "review_threshold": r["abstention"]["threshold_for_target"]}
        for name, r in reports.items()
    }


def _log_report(
    prefix: str,
    report: dict[str, Any],
    probabilities: npt.NDArray[np.floating[Any]],
    y: npt.NDArray[np.int64],
    work: Path,
    familiar: npt.NDArray[np.bool_] | None = None,
) -> None:
    """Metrics (``PREFIX_macro_f1``, per-class recall and F1, …) and the confusion, reliability and
    (when the report has one) risk–coverage plots of an evaluation report, to the active MLflow run."""
    work.mkdir(parents=True, exist_ok=True)
    metrics = {
        f"{prefix}_macro_f1": report["macro_f1"],
        f"{prefix}_accuracy": report["accuracy"],
        f"{prefix}_ece": report["ece"],
        **{f"{prefix}_recall_{label}": report["per_class"][label]["recall"] for label in LABELS},
        **{f"{prefix}_f1_{label}": report["per_class"][label]["f1"] for label in LABELS},
    }
    abstention = report.get("abstention", {}).get("at_threshold_for_target")
    if abstention:
        metrics[f"{prefix}_review_threshold"] = abstention["threshold"]
        metrics[f"{prefix}_coverage_at_99"] = abstention["coverage"]
        risk = plot_risk_coverage(
            probabilities,
            y,
            work / f"{prefix}_risk_coverage.png",
            threshold=abstention["threshold"],
            familiar=familiar,
        )
        mlflow.log_artifact(str(risk))
    mlflow.log_metrics(metrics)
    cm = np.asarray(report["confusion_matrix"])
    mlflow.log_artifact(str(plot_confusion_matrix(cm, LABELS, work / f"{prefix}_confusion_matrix.png")))
    mlflow.log_artifact(str(plot_reliability(probabilities, y, work / f"{prefix}_reliability.png")))


def cv_table(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: macro-F1 with its CI, per-class recall, ECE, the share the novelty check
    sends to review, the review threshold with the coverage that keeps auto-routed accuracy at 99%,
    and what the given review threshold does."""
    rows = []
    for name, report in reports.items():
        abstention = report["abstention"]["at_threshold_for_target"]
        rows.append(
            {
                "variant": name,
                "macro_f1": report["macro_f1"],
                "macro_f1_ci": report["macro_f1_ci"],
                "accuracy": report["accuracy"],
                "ece": report["ece"],
                "min_recall": min(report["per_class"][label]["recall"] for label in LABELS),
                "recall": {label: report["per_class"][label]["recall"] for label in LABELS},
                "review_threshold": abstention["threshold"],
                "unfamiliar": report["abstention"]["unfamiliar"],
                "coverage": abstention["coverage"],
                "auto_routed_accuracy": abstention["auto_routed_accuracy"],
                "at_review_threshold": report["abstention"]["at_review_threshold"],
                "without_novelty_check": report["abstention"].get(
                    "without_novelty_check", report["abstention"]["at_review_threshold"]
                ),
            }
        )
    return rows
