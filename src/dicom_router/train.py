"""Training one candidate: the paper's recipe (cross-entropy, Adam, cosine annealing with warm restarts)
plus balanced sampling, radiograph augmentation, early stopping on validation macro-F1, AMP and
channels_last on GPU, seeded determinism and checkpoints."""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import Progress
from timm.models import group_parameters
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from dicom_router import LABELS
from dicom_router.calibration import nll
from dicom_router.data import CachedImages, XrayDataset, class_weights, mixed_weights
from dicom_router.evaluate import confusion_matrix, macro_f1
from dicom_router.inference import PreprocessConfig
from dicom_router.models import BodyPartNet, Scorer
from dicom_router.weights import Weights

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """One candidate's hyper-parameters (all logged as MLflow params)."""

    model_config = ConfigDict(frozen=True)

    arch: str = "mobilenetv1_100"
    epochs: int = 30
    image_size: int = 256
    batch_size: int = 32
    lr: float = 1e-3
    """Learning rate of the head (and of a backbone trained from scratch)."""
    backbone_lr_scale: float = 1.0
    """The backbone's learning rate relative to ``lr``: below 1 fine-tunes pretrained features gently
    (the paper fine-tunes at 1e-4)."""
    warmup_epochs: int = 0
    """Epochs that train the head alone on a frozen backbone before the whole net is tuned."""
    frozen_stages: int = 0
    """Leading parameter groups of the backbone (stem first, then stages, timm's ``group_matcher``) that
    stay frozen throughout: generic low-level features, and a cheaper backward pass."""
    weight_decay: float = 1e-4
    restart_epochs: int = 10
    """T_0 of cosine annealing with warm restarts, in epochs."""
    patience: int = 8
    """Early stopping: epochs without a better validation macro-F1."""
    seed: int = 0
    metadata: bool = False
    """Fuse de-identified header features with the image embedding."""
    balanced: bool = True
    augment: bool = True
    views: bool = False
    """Stronger augmentation that mimics other sites and views (see ``data.augment``)."""
    pretrained: bool = False
    """Start the backbone from ImageNet weights (``weights.resolve``): a usage error when none is found."""
    init_weights: str | None = None
    """A weights file or folder to initialise from (implies ``pretrained``)."""
    pretrain_synthetic: int = 0
    """Synthetic images to pretrain the backbone on first (0: none), after ImageNet initialisation when
    ``pretrained``."""
    pretrain_epochs: int = 10
    mix_synthetic: int = 0
    """Synthetic images mixed into the training set itself (0: none), drawn at ``mix_share`` of every
    epoch: unlike pretraining, a later phase cannot forget the views they show."""
    mix_share: float = Field(default=0.25, ge=0.0, lt=1.0)
    synthetic_variety: bool = False
    """Synthetic images (pretraining or mixed in) also hold the views real archives hold
    (``phantoms.VARIETY``)."""
    equalize: bool = False
    """Histogram-equalise images in preprocessing (see PreprocessConfig)."""
    average_epochs: float = Field(default=0.0, ge=0.0)
    """Select and keep an exponential moving average of the fine-tuned weights and BatchNorm statistics
    over about this many epochs (0: the weights as trained): averaging along the trajectory lands in
    flatter minima, which hold better at unseen sites (SWAD, Cha et al. 2021)."""

    @property
    def name(self) -> str:
        """How runs and reports name this candidate."""
        return self.arch + ("+meta" if self.metadata else "")

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.image_size, metadata=self.metadata, equalize=self.equalize)


RECIPES: dict[str, dict[str, Any]] = {
    "scratch": {},
    "fine-tune": {
        "pretrained": True,
        "image_size": 288,
        "epochs": 12,
        "patience": 6,
        "warmup_epochs": 2,
        "backbone_lr_scale": 0.3,
        "frozen_stages": 1,
        "views": True,
        "equalize": True,
    },
}
"""Named training recipes (TrainConfig fields). ``fine-tune`` is the one source-grouped cross-validation
chose for small real data (bench/recipes.py): ImageNet weights, the head first, then the backbone at
0.3x the learning rate with its stem frozen, site/view augmentation, 288 px (averaging the weights,
``average_epochs``, failed the adoption rule on the third deal: README)."""

RECIPE_ARCHS: dict[str, tuple[str, ...]] = {
    "scratch": ("mobilenetv1_100",),
    "fine-tune": ("mobilenetv2_100", "mobilenetv1_100"),
}
"""The architectures a recipe trains when none is named. ``fine-tune``'s pair is what ``make train-real``
averages in one graph (``--ensemble``) and promotes: ahead of MobileNet-V2 alone over five paired deals
of collection-grouped CV and leaving one collection out (README), so benchmarks read the members here."""


def recipe_config(recipe: str, **fields: Any) -> TrainConfig:
    """A TrainConfig from a named recipe, ``fields`` overriding it."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[recipe], **fields})


@dataclass
class TrainResult:
    net: BodyPartNet
    best_epoch: int
    best_val_macro_f1: float
    history: list[dict[str, float]] = field(default_factory=list)
    images_per_second: float = 0.0


EpochCallback = Callable[[int, dict[str, float]], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def predict_scores(
    model: BodyPartNet | Scorer,
    cached: CachedImages,
    *,
    batch_size: int = 64,
    mirrored: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Log-probability scores (members and flips averaged, not yet tempered) and embeddings of a torch
    model on cached images (``mirrored``: on their mirror images): validation, cross-validation and
    calibration."""
    scorer = model if isinstance(model, Scorer) else Scorer([model])
    scorer.eval()
    dev = next(scorer.parameters()).device
    uses_meta = any(m.meta is not None for m in scorer.members)
    scores, embeddings = [], []
    loader = DataLoader(XrayDataset(cached, train=False), batch_size=batch_size)
    with torch.no_grad():
        for images, meta, _ in loader:
            view = images.flip(-1) if mirrored else images
            s, e = scorer.logits(view.to(dev), meta.to(dev) if uses_meta else None)
            scores.append(s.float().cpu().numpy())
            embeddings.append(e.float().cpu().numpy())
    if not scores:
        return np.zeros((0, len(LABELS)), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(scores), np.concatenate(embeddings)


def freeze_stages(backbone: nn.Module, stages: int) -> None:
    """Freeze the stem and leading stages (``stages`` of timm's coarse parameter groups) for good."""
    if stages <= 0:
        return
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        raise ValueError(f"{type(backbone).__name__} has no parameter groups: cannot freeze stages")
    groups = group_parameters(backbone, matcher(coarse=True))
    frozen = {name for index, names in groups.items() if int(index) < stages for name in names}
    for name, parameter in backbone.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)


def _keep_frozen_statistics(module: nn.Module) -> None:
    """BatchNorm layers whose parameters are all frozen keep their running statistics."""
    for layer in module.modules():
        params = list(layer.parameters(recurse=False))
        if (
            isinstance(layer, nn.modules.batchnorm._BatchNorm)
            and params
            and not any(p.requires_grad for p in params)
        ):
            layer.eval()


def _parameter_groups(net: BodyPartNet, config: TrainConfig) -> list[dict[str, Any]]:
    """The trainable backbone at ``lr * backbone_lr_scale``, the head (and header features) at ``lr``."""
    backbone = [p for p in net.backbone.parameters() if p.requires_grad]
    ids = {id(p) for p in net.backbone.parameters()}
    rest = [p for p in net.parameters() if id(p) not in ids]
    return [
        {"params": backbone, "lr": config.lr * config.backbone_lr_scale},
        {"params": rest, "lr": config.lr},
    ]


def training_pool(
    config: TrainConfig, train: CachedImages, synthetic: CachedImages | None = None
) -> tuple[CachedImages, WeightedRandomSampler | None, int]:
    """The images an epoch draws from, its sampler (None: a plain shuffle) and its number of draws:
    classes balanced when ``config.balanced``, ``synthetic`` images mixed in at ``config.mix_share`` of
    the draws, and as many draws as keep every real image drawn once per epoch on average."""
    weights: npt.NDArray[np.float64] | None
    if synthetic is not None and len(synthetic.keys):
        pool = train + synthetic
        weights = mixed_weights(train.labels, synthetic.labels, config.mix_share, balanced=config.balanced)
        draws = round(len(train.keys) / (1.0 - config.mix_share))
    else:
        pool, draws = train, len(train.keys)
        weights = class_weights(train.labels) if config.balanced else None
    if weights is None:
        return pool, None, draws
    generator = torch.Generator().manual_seed(config.seed)
    return pool, WeightedRandomSampler(weights.tolist(), draws, generator=generator), draws


@torch.no_grad()
def _follow(average: BodyPartNet, net: BodyPartNet, weight: float) -> None:
    """One step of a moving average: every float parameter and buffer of ``average`` moves ``weight``
    of the way to the net's (counters are copied)."""
    for mean, current in zip(average.state_dict().values(), net.state_dict().values(), strict=True):
        if mean.is_floating_point():
            mean.lerp_(current, weight)
        else:
            mean.copy_(current)


def train_candidate(
    config: TrainConfig,
    train: CachedImages,
    val: CachedImages,
    checkpoint: Path,
    *,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    init: Weights | None = None,
    backbone_state: dict[str, torch.Tensor] | None = None,
    synthetic: CachedImages | None = None,
) -> TrainResult:
    """Train with early stopping on validation macro-F1; the best weights are kept and returned.

    ``init`` is the ImageNet initialisation (``weights.resolve``); ``backbone_state`` starts the
    backbone from earlier training instead (synthetic pretraining). The first ``warmup_epochs`` train
    the head alone on the frozen backbone. ``synthetic`` images are mixed into training at
    ``config.mix_share`` of the draws; every real image is still drawn once per epoch on average.
    """
    seed_everything(config.seed)
    dev = device()
    cuda = dev.type == "cuda"
    net = BodyPartNet(config.arch, metadata=config.metadata, init=init)
    if backbone_state is not None:
        net.backbone.load_state_dict(backbone_state)
    freeze_stages(net.backbone, config.frozen_stages)
    trainable = {name for name, p in net.backbone.named_parameters() if p.requires_grad}
    net = net.to(dev)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    pool, sampler, draws = training_pool(config, train, synthetic)
    if len(pool.keys) > len(train.keys):
        log.info(
            "%s: %d synthetic images mixed into %d real ones at %.0f%% of the draws",
            config.name,
            len(pool.keys) - len(train.keys),
            len(train.keys),
            100 * config.mix_share,
        )
    loader = DataLoader(
        XrayDataset(pool, train=config.augment, seed=config.seed, views=config.views),
        batch_size=config.batch_size,
        sampler=sampler,
        shuffle=sampler is None,
        drop_last=draws > config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
    )
    warmup = min(config.warmup_epochs, config.epochs - 1)
    groups = _parameter_groups(net, config)
    optimizer = torch.optim.Adam(groups, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=max(1, config.restart_epochs * len(loader))
    )
    head = torch.optim.Adam(groups[1]["params"], lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    loss_fn = nn.CrossEntropyLoss()
    follow, averaged = 1.0 / max(1.0, config.average_epochs * len(loader)), 0
    average: BodyPartNet | None = None  # a plain mean of the first steps, then moving
    best: tuple[float, float] = (-1.0, 0.0)
    best_epoch, stale = 0, 0
    history: list[dict[str, float]] = []
    seen, train_seconds = 0, 0.0
    with Progress(disable=not progress, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(f"train {config.name}", total=config.epochs * len(loader))
        for epoch in range(1, config.epochs + 1):
            frozen = epoch <= warmup
            net.train()
            for name, parameter in net.backbone.named_parameters():
                parameter.requires_grad_(not frozen and name in trainable)
            _keep_frozen_statistics(net.backbone)
            total_loss, batches, start = 0.0, 0, time.perf_counter()
            for images, meta, labels in loader:
                images = images.to(dev, non_blocking=True)
                if cuda:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, enabled=cuda):
                    logits, _ = net(images, meta.to(dev) if config.metadata else None)
                    loss = loss_fn(logits.float(), labels.to(dev))
                step = head if frozen else optimizer
                step.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(step)
                scaler.update()
                if not frozen:
                    scheduler.step()
                    if config.average_epochs:
                        averaged += 1
                        average = copy.deepcopy(net) if average is None else average
                        _follow(average, net, max(follow, 1.0 / averaged))
                total_loss += float(loss.detach())
                batches += 1
                seen += len(labels)
                bar.advance(task)
            train_seconds += time.perf_counter() - start
            chosen = net if average is None else average
            scores, _ = predict_scores(chosen, val)
            val_f1 = macro_f1(confusion_matrix(val.labels, scores.argmax(axis=1), len(LABELS)))
            val_nll = nll(scores, val.labels, 1.0) if len(val.labels) else 0.0
            metrics = {"train_loss": total_loss / max(batches, 1), "val_macro_f1": val_f1, "val_nll": val_nll}
            history.append(metrics)
            if on_epoch:
                on_epoch(epoch, metrics)
            log.info(
                "%s epoch %d: loss %.4f, val macro-F1 %.4f, val NLL %.4f",
                config.name,
                epoch,
                *metrics.values(),
            )
            # The best epoch: highest validation macro-F1, ties (a small validation set has many) to the
            # lower NLL; warm-up epochs only start the fine-tuning and are not candidates themselves.
            candidate = epoch > warmup
            if candidate and (val_f1, -val_nll) > best:
                best, best_epoch, stale = (val_f1, -val_nll), epoch, 0
                torch.save(chosen.state_dict(), checkpoint)
            elif not frozen:
                stale += 1
                if stale >= config.patience:
                    log.info("%s: early stop after epoch %d (best %d)", config.name, epoch, best_epoch)
                    break
    net.requires_grad_(True)
    net.load_state_dict(torch.load(checkpoint, map_location=dev))
    net = net.to(memory_format=torch.contiguous_format).cpu().eval()
    return TrainResult(net, best_epoch, best[0], history, seen / max(train_seconds, 1e-9))
