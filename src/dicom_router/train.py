"""Training one candidate: the paper's recipe (cross-entropy, Adam, cosine annealing with warm restarts)
plus balanced sampling, radiograph augmentation, early stopping on validation macro-F1, AMP and
channels_last on GPU, seeded determinism and checkpoints."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from dicom_router import LABELS
from dicom_router.data import CachedImages, XrayDataset, class_weights
from dicom_router.evaluate import confusion_matrix, macro_f1
from dicom_router.inference import PreprocessConfig
from dicom_router.models import BodyPartNet

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """One candidate's hyper-parameters (all logged as MLflow params)."""

    model_config = ConfigDict(frozen=True)

    arch: str = "mobilenetv1_100"
    epochs: int = 30
    image_size: int = 256
    batch_size: int = 32
    lr: float = 1e-3
    """The paper fine-tunes at 1e-4 from ImageNet weights; from scratch (no hub here) 1e-3 learns."""
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
    pretrained: bool = False
    pretrain_synthetic: int = 0
    """Synthetic images to pretrain the backbone on first (0: none); no weights can be downloaded here,
    and synthetic anatomy is the legitimate prior available."""
    pretrain_epochs: int = 10
    equalize: bool = False
    """Histogram-equalise images in preprocessing (see PreprocessConfig)."""

    @property
    def name(self) -> str:
        """How runs and reports name this candidate."""
        return self.arch + ("+meta" if self.metadata else "")

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.image_size, metadata=self.metadata, equalize=self.equalize)


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


def predict_probabilities(
    net: BodyPartNet, cached: CachedImages, *, batch_size: int = 64
) -> npt.NDArray[np.float32]:
    """Softmax outputs of a torch model on cached images (validation during training)."""
    net.eval()
    dev = next(net.parameters()).device
    out = []
    loader = DataLoader(XrayDataset(cached, train=False), batch_size=batch_size)
    with torch.no_grad():
        for images, meta, _ in loader:
            logits, _ = net(images.to(dev), meta.to(dev) if net.meta is not None else None)
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(LABELS)), np.float32)


def train_candidate(
    config: TrainConfig,
    train: CachedImages,
    val: CachedImages,
    checkpoint: Path,
    *,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    backbone_state: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train with early stopping on validation macro-F1; the best weights are kept and returned.

    ``backbone_state`` starts the backbone from earlier training (synthetic pretraining).
    """
    seed_everything(config.seed)
    dev = device()
    cuda = dev.type == "cuda"
    net = BodyPartNet(config.arch, metadata=config.metadata, pretrained=config.pretrained)
    if backbone_state is not None:
        net.backbone.load_state_dict(backbone_state)
    net = net.to(dev)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    sampler = None
    if config.balanced:
        weights = class_weights(train.labels).tolist()
        generator = torch.Generator().manual_seed(config.seed)
        sampler = WeightedRandomSampler(weights, num_samples=len(train.keys), generator=generator)
    loader = DataLoader(
        XrayDataset(train, train=config.augment, seed=config.seed),
        batch_size=config.batch_size,
        sampler=sampler,
        shuffle=sampler is None,
        drop_last=len(train.keys) > config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=max(1, config.restart_epochs * len(loader))
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    loss_fn = nn.CrossEntropyLoss()
    best, best_epoch, stale = -1.0, 0, 0
    history: list[dict[str, float]] = []
    seen, train_seconds = 0, 0.0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"train {config.arch}", total=config.epochs * len(loader))
        for epoch in range(1, config.epochs + 1):
            net.train()
            total_loss, batches, start = 0.0, 0, time.perf_counter()
            for images, meta, labels in loader:
                images = images.to(dev, non_blocking=True)
                if cuda:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, enabled=cuda):
                    logits, _ = net(images, meta.to(dev) if config.metadata else None)
                    loss = loss_fn(logits.float(), labels.to(dev))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total_loss += float(loss.detach())
                batches += 1
                seen += len(labels)
                bar.advance(task)
            train_seconds += time.perf_counter() - start
            probabilities = predict_probabilities(net, val)
            val_f1 = macro_f1(confusion_matrix(val.labels, probabilities.argmax(axis=1), len(LABELS)))
            metrics = {"train_loss": total_loss / max(batches, 1), "val_macro_f1": val_f1}
            history.append(metrics)
            if on_epoch:
                on_epoch(epoch, metrics)
            log.info("%s epoch %d: loss %.4f, val macro-F1 %.4f", config.arch, epoch, *metrics.values())
            if val_f1 > best:
                best, best_epoch, stale = val_f1, epoch, 0
                torch.save(net.state_dict(), checkpoint)
            else:
                stale += 1
                if stale >= config.patience:
                    log.info("%s: early stop after epoch %d (best %d)", config.arch, epoch, best_epoch)
                    break
    net.load_state_dict(torch.load(checkpoint, map_location=dev))
    net = net.to(memory_format=torch.contiguous_format).cpu().eval()
    return TrainResult(net, best_epoch, best, history, seen / max(train_seconds, 1e-9))
