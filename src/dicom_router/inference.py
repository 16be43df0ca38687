"""One code path from DICOM bytes to a label: preprocessing, the model bundle, ONNX Runtime.

``predict``, evaluation, the promotion gate and the model server all call ``Bundle.predict_bytes`` /
``prepare``; training caches the output of the same ``letterbox`` so what a model saw in training is
what it sees in production.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydantic import BaseModel, ConfigDict

from dicom_router import LABELS
from dicom_router.config import Settings
from dicom_router.dicom.decode import DecodedImage, decode_bytes
from dicom_router.dicom.deid import acquisition_fields, pixel_spacing_mm
from dicom_router.dicom.errors import DicomInputError
from dicom_router.monitoring.features import image_statistics

log = logging.getLogger(__name__)

BUNDLE_FILES = ("model.onnx", "labels.json", "preprocess.json", "card.json")
VIEW_GROUPS = ("PA", "AP", "LAT", "OTHER")
METADATA_FEATURES: tuple[str, ...] = (
    "age_years",
    "age_missing",
    *(f"view_{v.lower()}" for v in VIEW_GROUPS),
    "view_missing",
    "pixel_spacing_mm",
    "pixel_spacing_missing",
    "monochrome1",
    "modality_cr",
    "modality_dx",
    "modality_other",
    "log_aspect",
)
"""Header features that survive de-identification, each with a missing indicator where it can be absent,
so a fusion model works on any header."""


class PreprocessConfig(BaseModel):
    """Everything needed to turn a decoded DICOM image into the model input (``preprocess.json``)."""

    model_config = ConfigDict(frozen=True)

    image_size: int = 256
    """The square input side: the image is scaled to fit (aspect kept) and padded with black."""
    metadata: bool = False
    """Whether the model also takes the header features (``meta`` input, METADATA_FEATURES order)."""
    equalize: bool = False
    """Histogram-equalise the displayed image first: evens out contrast and processing across sites."""

    def fingerprint(self) -> str:
        """What the cached pixels depend on (not ``metadata``: header features are computed apart)."""
        return f"s{self.image_size}" + ("-eq" if self.equalize else "")


def equalize(pixels: npt.NDArray[np.float32], bins: int = 1024) -> npt.NDArray[np.float32]:
    """Map grey levels through their cumulative histogram (pure black, i.e. padding, stays black).

    The grid is uniform, so bins and interpolation positions are computed directly (what
    ``np.histogram`` + ``np.interp`` give, to float32 rounding), reusing the scaled image and its bin
    indices in place instead of making a dozen temporaries: it runs on every routed instance, at the
    decoded size."""
    scaled = pixels * np.float32(bins)
    index = scaled.astype(np.int32)  # pixels are in [0, 1]: truncation is the floor
    np.minimum(index, bins - 1, out=index)
    counts = np.bincount(index.ravel(), minlength=bins)
    black = pixels.size - int(np.count_nonzero(pixels))
    if black == pixels.size:
        return pixels
    counts[0] -= black  # padding is not part of the image's histogram
    cdf = np.cumsum(counts, dtype=np.float64)
    cdf = (cdf / cdf[-1]).astype(np.float32)
    # cdf[k] belongs to the upper edge (k + 1) / bins: interpolate between edges k and k + 1 at
    # position scaled - 1, i.e. k = clip(index - 1) and the rest of the position as the fraction.
    index -= 1
    np.clip(index, 0, bins - 2, out=index)
    scaled -= np.float32(1.0)
    scaled -= index
    np.clip(scaled, 0.0, 1.0, out=scaled)
    out: npt.NDArray[np.float32] = np.diff(cdf)[index]
    out *= scaled
    out += cdf[index]
    if black:
        out[pixels == 0.0] = 0.0
    return out


def letterbox(pixels: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """Scale the longer side to ``size`` (antialiased bilinear), pad the rest with black (0).

    Pillow's float (``F``) resampling: the triangle filter widened by the scale factor, weights and sums
    in double precision. It is what torch's ``interpolate(bilinear, antialias=True)`` ports (equal to
    ~1e-6, torch's float32 rounding), and it keeps torch out of the serving and routing images."""
    h, w = pixels.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))
    resized = np.asarray(image.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.clip(resized, 0.0, 1.0)
    return out


def metadata_vector(fields: Mapping[str, Any]) -> npt.NDArray[np.float32]:
    """Catalog/acquisition fields → METADATA_FEATURES (missing values are zeros plus an indicator)."""
    age = _number(fields.get("age_years"))
    view = str(fields.get("view_position") or "").upper()
    group = (
        "PA"
        if view == "PA"
        else "AP"
        if view == "AP"
        else "LAT"
        if view in ("LL", "RL", "LAT", "LATERAL")
        else "OTHER"
    )
    spacing = _number(fields.get("pixel_spacing"))
    modality = str(fields.get("modality") or "").upper()
    rows, columns = _number(fields.get("rows")), _number(fields.get("columns"))
    values = [
        (age or 0.0) / 100.0,
        float(age is None),
        *(float(bool(view) and group == g) for g in VIEW_GROUPS),
        float(not view),
        min(spacing or 0.0, 1.0),
        float(spacing is None),
        float(str(fields.get("photometric") or "") == "MONOCHROME1"),
        float(modality == "CR"),
        float(modality == "DX"),
        float(modality not in ("CR", "DX")),
        math.log(rows / columns) if rows and columns else 0.0,
    ]
    return np.asarray(values, dtype=np.float32)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


@dataclass(frozen=True)
class Prepared:
    image: npt.NDArray[np.float32]
    """``[1, S, S]`` in [0, 1]."""
    meta: npt.NDArray[np.float32]
    statistics: dict[str, float]
    """The decoded image's grey-level facts (``statistics_of``): the inference log takes them from this
    decode instead of decoding the instance again."""


def statistics_of(decoded: DecodedImage) -> dict[str, float]:
    """Grey-level facts of a decoded image as drift monitoring compares them."""
    return image_statistics(decoded.pixels, pixel_spacing_mm(decoded.dataset))


def prepare(data: bytes, path: str, config: PreprocessConfig, *, max_pixels: int) -> Prepared:
    """DICOM bytes → model inputs (and the image's statistics); typed errors for bad input."""
    decoded = decode_bytes(data, path, max_pixels=max_pixels)
    pixels = equalize(decoded.pixels) if config.equalize else decoded.pixels
    image = letterbox(pixels, config.image_size)[None]
    return Prepared(image, metadata_vector(acquisition_fields(decoded.dataset)), statistics_of(decoded))


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    probabilities: dict[str, float]
    novelty: float | None = None
    """How unlike the training images it is (``novelty``; above 1.0: unfamiliar); None when the bundle
    predates novelty."""

    def as_dict(self) -> dict[str, Any]:
        out = {"label": self.label, "confidence": self.confidence, "probabilities": self.probabilities}
        return out if self.novelty is None else {**out, "novelty": self.novelty}


class Scores(NamedTuple):
    """One ONNX Runtime call's outputs, row by row as the inputs."""

    probabilities: npt.NDArray[np.float32]
    """``[n, 5]``, calibrated."""
    embedding: npt.NDArray[np.float32]
    """``[n, D]``."""
    novelty: npt.NDArray[np.float32] | None
    """``[n]``; None when the bundle has no ``novelty`` output (bundles exported before it)."""

    def rows(self, start: int, end: int) -> Scores:
        return Scores(
            self.probabilities[start:end],
            self.embedding[start:end],
            None if self.novelty is None else self.novelty[start:end],
        )


ALLOW_SPINNING = "session.intra_op.allow_spinning"
"""ONNX Runtime's session option that lets idle worker threads spin-wait (``"0"`` here: see ``Bundle``)."""


class Bundle:
    """The contract's model bundle on disk, run with ONNX Runtime (CUDA provider when available)."""

    def __init__(self, path: Path, *, name: str = "bodypart-router", version: str = "local") -> None:
        import onnxruntime as ort

        missing = [f for f in BUNDLE_FILES if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a model bundle: missing {', '.join(missing)}")
        self.path = path
        self.name = name
        self.version = version
        self.labels: list[str] = json.loads((path / "labels.json").read_text())
        self.preprocess = PreprocessConfig.model_validate_json((path / "preprocess.json").read_text())
        self.card: dict[str, Any] = json.loads((path / "card.json").read_text())
        threshold = self.card.get("review_threshold")
        self.review_threshold: float | None = None if threshold is None else float(threshold)
        """The confidence that kept auto-routed accuracy at 99% in the training's collection-grouped
        cross-validation (rules' ``below_confidence: model``); None when it was trained without one."""
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" in available:  # the GPU image: CUDA and cuDNN come as NVIDIA's wheels
            ort.preload_dlls()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # ONNX Runtime's threads spin-wait between runs by default. On a node shared with Orthanc, the
        # router and the decode workers that burns the CPU they need: with 4 concurrent clients the model
        # server spent 47 CPU-ms per image with spinning and 27 without, and bench/routing.py's chain went
        # from 17 to 23 instances/s on 2 cores.
        options.add_session_config_entry(ALLOW_SPINNING, "0")
        self.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=providers)
        self.outputs = [
            name
            for name in ("probabilities", "embedding", "novelty")
            if name in {o.name for o in self.session.get_outputs()}
        ]

    def run(self, images: npt.NDArray[np.float32], meta: npt.NDArray[np.float32] | None = None) -> Scores:
        """Batched inputs → probabilities ``[n, 5]``, embeddings ``[n, D]`` and novelty ``[n]``."""
        feeds = {"image": np.ascontiguousarray(images, dtype=np.float32)}
        if self.preprocess.metadata:
            if meta is None:
                raise ValueError("this model also takes header features (meta)")
            feeds["meta"] = np.ascontiguousarray(meta, dtype=np.float32)
        found = [np.asarray(x) for x in self.session.run(self.outputs, feeds)]
        return Scores(found[0], found[1], found[2] if len(found) > 2 else None)

    def prediction(self, probabilities: npt.NDArray[np.float32], novelty: float | None = None) -> Prediction:
        best = int(np.argmax(probabilities))
        return Prediction(
            self.labels[best],
            float(probabilities[best]),
            {label: float(p) for label, p in zip(self.labels, probabilities, strict=True)},
            None if novelty is None else float(novelty),
        )

    def predictions(self, scores: Scores) -> list[Prediction]:
        """One ``Prediction`` per row of a ``run``."""
        novelty = [None] * len(scores.probabilities) if scores.novelty is None else scores.novelty.tolist()
        return [self.prediction(row, n) for row, n in zip(scores.probabilities, novelty, strict=True)]

    def predict_items(
        self, items: Sequence[tuple[str, bytes]], *, max_pixels: int, batch_size: int = 32
    ) -> tuple[list[Prediction | DicomInputError], float]:
        """Classify (path, bytes) pairs in batches; bad inputs come back as their typed error.

        Returns the results in input order and the mean milliseconds per classified image.
        """
        results: list[Prediction | DicomInputError | None] = [None] * len(items)
        start = time.perf_counter()
        done = 0
        for offset in range(0, len(items), batch_size):
            batch: list[tuple[int, Prepared]] = []
            for i, (path, data) in enumerate(items[offset : offset + batch_size], start=offset):
                try:
                    batch.append((i, prepare(data, path, self.preprocess, max_pixels=max_pixels)))
                except DicomInputError as exc:
                    results[i] = exc
            if not batch:
                continue
            scores = self.run(np.stack([p.image for _, p in batch]), np.stack([p.meta for _, p in batch]))
            for (i, _), prediction in zip(batch, self.predictions(scores), strict=True):
                results[i] = prediction
            done += len(batch)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        final = [r for r in results if r is not None]
        return final, elapsed_ms / max(done, 1)


def bundle_at(uri: str, settings: Settings) -> Bundle:
    """A bundle outside the registry: ``s3://`` (a version published to the bucket, what a plain
    Deployment's predictor serves), downloaded once under ``data_dir/bundles``, or a local folder."""
    if not uri.startswith("s3://"):
        return Bundle(Path(uri))
    from dicom_router.storage import download_folder, open_store

    name = hashlib.sha256(uri.encode()).hexdigest()[:16]
    folder = settings.data_dir / "bundles" / name
    if not folder.is_dir():  # a published version never changes: fetched once, whole or not at all
        partial = folder.with_name(f"{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        count = download_folder(open_store(uri, settings), partial)
        partial.rename(folder)
        log.info("downloaded %d bundle files from %s", count, uri)
    return Bundle(folder)


def check_labels(labels: Sequence[str]) -> None:
    if tuple(labels) != LABELS:
        raise ValueError(f"model labels {list(labels)} differ from the contract's {list(LABELS)}")
