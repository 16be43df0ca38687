"""The paper's CNN zoo from timm (1 input channel, 5 classes), an optional header-feature fusion head,
and the ONNX export that makes a model bundle."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dicom_router import LABELS
from dicom_router.inference import METADATA_FEATURES, PreprocessConfig

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
NORMALISE = (0.5, 0.25)
"""Mean and std applied inside the network, so the exported model takes plain [0, 1] images."""


class PretrainedUnavailable(RuntimeError):
    """Weights were asked for but cannot be fetched (no model hub is reachable from here)."""


def backbone(arch: str, *, pretrained: bool) -> nn.Module:
    """A timm feature extractor (no classifier) with one input channel."""
    if arch not in timm.list_models():
        raise ValueError(f"unknown architecture {arch!r}; e.g. {', '.join(PAPER_ZOO)}")
    try:
        model: nn.Module = timm.create_model(arch, pretrained=pretrained, in_chans=1, num_classes=0)
    except Exception as exc:
        if not pretrained:
            raise
        raise PretrainedUnavailable(
            f"pretrained weights for {arch} could not be loaded ({type(exc).__name__}: {exc}); "
            "this machine reaches no model hub: train from scratch (drop --pretrained) or put the "
            "weights in the Hugging Face cache and set HF_HUB_OFFLINE=1"
        ) from None
    return model


class BodyPartNet(nn.Module):
    """Backbone embedding (+ header-feature embedding when ``metadata``) → linear classifier."""

    def __init__(self, arch: str, *, metadata: bool = False, pretrained: bool = False) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = backbone(arch, pretrained=pretrained)
        features = int(getattr(self.backbone, "num_features", 0))
        self.meta: nn.Module | None = None
        if metadata:
            self.meta = nn.Sequential(nn.Linear(len(METADATA_FEATURES), 32), nn.ReLU())
            features += 32
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(features, len(LABELS))
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(NORMALISE[0]))
        self.register_buffer("std", torch.tensor(NORMALISE[1]))

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


class _Serving(nn.Module):
    """What the bundle exports: probabilities (softmax) and the embedding."""

    def __init__(self, net: BodyPartNet) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, image: torch.Tensor, meta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding = self.net(image, meta)
        return torch.softmax(logits, dim=1), embedding


def export_bundle(net: BodyPartNet, preprocess: PreprocessConfig, card: dict[str, Any], out: Path) -> Path:
    """Write the contract's model bundle: model.onnx (dynamic batch), labels, preprocessing, card."""
    out.mkdir(parents=True, exist_ok=True)
    serving = _Serving(net).eval().cpu()
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
        output_names=["probabilities", "embedding"],
        dynamic_shapes=shapes,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    assert program is not None
    program.save(str(out / "model.onnx"))
    (out / "labels.json").write_text(json.dumps(list(LABELS)))
    (out / "preprocess.json").write_text(preprocess.model_dump_json(indent=2))
    (out / "card.json").write_text(json.dumps({"arch": net.arch, **card}, indent=2, default=str))
    log.info("exported %s bundle to %s", net.arch, out)
    return out
