"""Training data: labelled examples from a catalog, patient-grouped stratified splits, and a cache of
preprocessed images so no epoch after the first (and no later run) decodes DICOM again."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812
from rich.console import Console
from rich.progress import Progress
from torch.utils.data import Dataset

from dicom_router import LABELS
from dicom_router.config import Settings
from dicom_router.dicom.errors import ERRORS_BY_TYPE, DicomInputError
from dicom_router.inference import PreprocessConfig, metadata_vector, prepare
from dicom_router.storage import Store, open_store

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SHARD_SIZE = 256


@dataclass(frozen=True)
class Split:
    """Which instance (SOP UID pseudonym) is in which split, and a fingerprint of that assignment."""

    assignment: dict[str, str]
    seed: int

    @property
    def fingerprint(self) -> str:
        text = "\n".join(f"{k}\t{v}" for k, v in sorted(self.assignment.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def of(self, name: str) -> list[str]:
        return sorted(k for k, v in self.assignment.items() if v == name)

    def to_json(self) -> str:
        return json.dumps({"seed": self.seed, "fingerprint": self.fingerprint, "assignment": self.assignment})

    @classmethod
    def from_json(cls, text: str) -> Split:
        data = json.loads(text)
        return cls(data["assignment"], data["seed"])


def split_examples(
    frame: pd.DataFrame, *, seed: int, fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
) -> Split:
    """70/15/15 stratified by label and grouped by patient: no patient in two splits.

    Each patient goes with their most frequent label; within a label, patients are shuffled (seeded) and
    dealt to the split furthest below its target share of that label's instances. With a handful of
    patients per label every one of them can fall to train; a split with a share that got no patient at
    all then takes the smallest train patient of the largest label that keeps another one in train, so
    whether a small set splits does not hang on the order the pseudonyms happened to shuffle into.
    """
    rng = np.random.default_rng(seed)
    groups = frame["patient_hash"].fillna(frame["sop_uid_hash"])
    by_label: defaultdict[str, list[list[str]]] = defaultdict(list)
    for _, members in frame.groupby(groups, sort=True):
        label = str(members["label"].mode().iloc[0])
        by_label[label].append([str(k) for k in members["sop_uid_hash"]])
    dealt: list[tuple[str, list[str], str]] = []  # (label, instances, split), one per patient
    for label in sorted(by_label):
        patients = by_label[label]
        total = sum(len(p) for p in patients)
        counts = dict.fromkeys(SPLITS, 0)
        for index in rng.permutation(len(patients)):
            instances = patients[index]
            deficit = {s: f * total - counts[s] for s, f in zip(SPLITS, fractions, strict=True)}
            chosen = max(SPLITS, key=lambda s: (deficit[s], -SPLITS.index(s)))
            counts[chosen] += len(instances)
            dealt.append((label, instances, chosen))
    for name, fraction in zip(SPLITS[1:], fractions[1:], strict=True):
        if fraction > 0 and all(split != name for _, _, split in dealt):
            _move_one_from_train(dealt, name)
    assignment = {k: split for _, instances, split in dealt for k in instances}
    empty = [s for s in ("train", "val") if s not in set(assignment.values())]
    if empty:  # (an empty test split is allowed: cross-validation folds train without one)
        raise ValueError(
            f"{groups.nunique()} patient(s) cannot fill train and val (no patient is in two splits): "
            f"{', '.join(empty)} would be empty; label more patients"
        )
    return Split(assignment, seed)


def _move_one_from_train(dealt: list[tuple[str, list[str], str]], name: str) -> None:
    """Give split ``name`` the smallest train patient of the largest label left with two in train."""
    in_train: defaultdict[str, int] = defaultdict(int)
    size: defaultdict[str, int] = defaultdict(int)
    for label, instances, split in dealt:
        size[label] += len(instances)
        in_train[label] += split == "train"
    spare = [i for i, (label, _, split) in enumerate(dealt) if split == "train" and in_train[label] >= 2]
    if spare:
        index = min(spare, key=lambda i: (-size[dealt[i][0]], len(dealt[i][1])))
        label, instances, _ = dealt[index]
        dealt[index] = (label, instances, name)


# --- the preprocessed-image cache -----------------------------------------------------------------


@dataclass
class CachedImages:
    """Preprocessed images (uint16, [N, S, S]) with their instance hashes, labels and header features."""

    keys: list[str]
    images: npt.NDArray[np.uint16]
    labels: npt.NDArray[np.int64]
    meta: npt.NDArray[np.float32]

    def select(self, keys: Sequence[str]) -> CachedImages:
        index = {k: i for i, k in enumerate(self.keys)}
        rows = [index[k] for k in keys if k in index]
        return CachedImages(
            [self.keys[i] for i in rows], self.images[rows], self.labels[rows], self.meta[rows]
        )

    def __add__(self, other: CachedImages) -> CachedImages:
        """Both sets of images, these first (e.g. real training images and synthetic ones mixed in)."""
        return CachedImages(
            self.keys + other.keys,
            np.concatenate([self.images, other.images]),
            np.concatenate([self.labels, other.labels]),
            np.concatenate([self.meta, other.meta]),
        )


def _decode_rows(
    store: Store, rows: list[dict[str, Any]], config: PreprocessConfig, max_pixels: int
) -> tuple[list[tuple[str, npt.NDArray[np.uint16]]], list[tuple[str, DicomInputError]]]:
    """Preprocessed images by SOP pseudonym, and the decode errors by SOP pseudonym."""
    done, errors = [], []
    for row in rows:
        path = f"{store.uri.rstrip('/')}/{row['key']}"
        try:
            prepared = prepare(store.read(row["key"]), path, config, max_pixels=max_pixels)
        except DicomInputError as exc:
            errors.append((row["sop_uid_hash"], exc))
            continue
        done.append((row["sop_uid_hash"], np.round(prepared.image[0] * 65535.0).astype(np.uint16)))
    return done, errors


def _remembered_errors(
    data: Any, shard: list[dict[str, Any]], *, store_uri: str
) -> Iterator[DicomInputError]:
    """A cached shard's decode errors, as the first run raised them."""
    if "error_keys" not in data:
        return
    keys = {r["sop_uid_hash"]: r["key"] for r in shard}
    for sop, kind, reason in zip(data["error_keys"], data["error_types"], data["error_reasons"], strict=True):
        yield ERRORS_BY_TYPE[str(kind)](f"{store_uri.rstrip('/')}/{keys[str(sop)]}", str(reason))


def build_cache(
    frame: pd.DataFrame,
    source: str,
    config: PreprocessConfig,
    settings: Settings,
    *,
    progress: bool = True,
) -> tuple[CachedImages, list[DicomInputError]]:
    """Decode every catalog row once and keep the result in shards under ``settings.cache_location``.

    Shards are keyed by the preprocessing and the content of the instances they hold (SOP pseudonym and
    object hash), so a later run (another architecture, more epochs) over the same data reads arrays
    instead of decoding DICOM, and a changed object is decoded again. A shard also remembers the decode
    errors, so a cached run reports exactly what the first one did.
    """
    cache = open_store(f"{settings.cache_location.rstrip('/')}/{config.fingerprint()}", settings)
    store = open_store(source, settings)
    contents = frame["content_hash"] if "content_hash" in frame else [None] * len(frame)
    rows: list[dict[str, Any]] = [
        {"key": str(k), "sop_uid_hash": str(h), "content": c or f"{source}/{k}"}
        for k, h, c in zip(frame["key"], frame["sop_uid_hash"], contents, strict=True)
    ]
    images: dict[str, npt.NDArray[np.uint16]] = {}
    errors: list[DicomInputError] = []
    todo: list[tuple[str, list[dict[str, Any]]]] = []
    for start in range(0, len(rows), SHARD_SIZE):
        shard = rows[start : start + SHARD_SIZE]
        identity = "\n".join(f"{r['sop_uid_hash']} {r['content']}" for r in shard)
        name = f"{hashlib.sha256(identity.encode()).hexdigest()[:20]}.npz"
        if cache.exists(name):
            with np.load(io.BytesIO(cache.read(name))) as data:
                images.update(zip(data["keys"].tolist(), data["images"], strict=True))
                errors.extend(_remembered_errors(data, shard, store_uri=store.uri))
        else:
            todo.append((name, shard))
    with (
        Progress(disable=not progress, transient=True, console=Console(stderr=True)) as bar,
        ProcessPoolExecutor(max_workers=max(1, settings.workers)) as pool,
    ):
        task = bar.add_task("decode + resize (cached once)", total=sum(len(s) for _, s in todo))
        chunks = [(name, shard[i : i + 16]) for name, shard in todo for i in range(0, len(shard), 16)]
        futures = [
            pool.submit(_decode_rows, store, chunk, config, settings.max_image_pixels) for _, chunk in chunks
        ]
        per_shard: defaultdict[str, list[tuple[str, npt.NDArray[np.uint16]]]] = defaultdict(list)
        failed: defaultdict[str, list[tuple[str, DicomInputError]]] = defaultdict(list)
        for (name, chunk), future in zip(chunks, futures, strict=True):
            done, bad = future.result()
            per_shard[name].extend(done)
            failed[name].extend(bad)
            errors.extend(e for _, e in bad)
            bar.advance(task, len(chunk))
    for name, _ in todo:
        done = per_shard[name]
        buf = io.BytesIO()
        np.savez(
            buf,
            keys=np.array([k for k, _ in done], dtype=str),
            images=np.stack([a for _, a in done])
            if done
            else np.zeros((0, config.image_size, config.image_size), np.uint16),
            error_keys=np.array([k for k, _ in failed[name]], dtype=str),
            error_types=np.array([e.type for _, e in failed[name]], dtype=str),
            error_reasons=np.array([e.reason for _, e in failed[name]], dtype=str),
        )
        cache.write(name, buf.getvalue())
        images.update(done)
    if todo:
        log.info("cached %d preprocessed images in %s", sum(len(per_shard[n]) for n, _ in todo), cache.uri)
    kept = frame[frame["sop_uid_hash"].isin(images)]
    return (
        CachedImages(
            [str(k) for k in kept["sop_uid_hash"]],
            np.stack([images[k] for k in kept["sop_uid_hash"]])
            if len(kept)
            else np.zeros((0, 1, 1), np.uint16),
            np.array([LABELS.index(str(label)) for label in kept["label"]], dtype=np.int64),
            np.stack(
                [metadata_vector({str(k): v for k, v in r.items()}) for r in kept.to_dict("records")]
            ).astype(np.float32)
            if len(kept)
            else np.zeros((0, 1), np.float32),
        ),
        errors,
    )


# --- torch dataset with radiograph-appropriate augmentation ------------------------------------


def augment(image: torch.Tensor, generator: torch.Generator, *, views: bool = False) -> torch.Tensor:
    """Radiograph augmentation of ``image`` ([1, S, S] in [0, 1]).

    Always: small rotation, scale and shift; horizontal flip (a body part does not change with side);
    brightness, contrast and gamma; detector-like noise. With ``views`` it mimics other sites and views:
    quarter turns and vertical flips (lateral, decubitus and mis-oriented films), crops that show part of
    the anatomy, steeper processing curves, blur, collimation edges and burnt-in text markers.
    """

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(1, generator=generator))

    def chance(p: float) -> bool:
        return uniform(0.0, 1.0) < p

    degrees = uniform(-10.0, 10.0)
    scale, shift = uniform(0.85, 1.15), 0.06
    vflip = 1.0
    if views:
        degrees = uniform(-15.0, 15.0) + (90.0 * (1 if chance(0.5) else -1) if chance(0.25) else 0.0)
        scale, shift = (uniform(1.1, 1.7), 0.25) if chance(0.3) else (uniform(0.8, 1.2), 0.1)
        vflip = -1.0 if chance(0.15) else 1.0
    angle = math.radians(degrees)
    tx, ty = uniform(-shift, shift), uniform(-shift, shift)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    flip = -1.0 if chance(0.5) else 1.0
    theta = torch.tensor([[cos * flip, -sin * vflip, tx], [sin * flip, cos * vflip, ty]], dtype=image.dtype)
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    out = out.clamp(0.0, 1.0) ** (uniform(0.5, 2.0) if views else uniform(0.7, 1.4))
    if views and chance(0.3):
        # a sigmoid processing curve (steeper or flatter contrast around a random midpoint)
        gain, mid = uniform(4.0, 12.0), uniform(0.35, 0.65)
        low, high = torch.sigmoid(torch.tensor(-gain * mid)), torch.sigmoid(torch.tensor(gain * (1 - mid)))
        out = (torch.sigmoid(gain * (out - mid)) - low) / (high - low)
    out = (out - 0.5) * uniform(0.8, 1.2) + 0.5 + uniform(-0.1, 0.1)
    if views and chance(0.2):
        out = F.avg_pool2d(out[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    noise = torch.randn(out.shape, generator=generator) * uniform(0.0, 0.03)
    out = (out + noise).clamp(0.0, 1.0)
    if views:
        out = _collimate_and_mark(out, uniform, chance)
    return out


def _collimate_and_mark(
    image: torch.Tensor, uniform: Callable[[float, float], float], chance: Callable[[float], bool]
) -> torch.Tensor:
    """Collimation (black edges on some sides) and bright rectangular text/side markers."""
    _, h, w = image.shape
    out = image.clone()
    if chance(0.3):
        top, bottom = int(h * uniform(0.0, 0.15)), int(h * uniform(0.0, 0.15))
        left, right = int(w * uniform(0.0, 0.15)), int(w * uniform(0.0, 0.15))
        out[:, :top] = 0.0
        out[:, h - bottom :] = 0.0
        out[:, :, :left] = 0.0
        out[:, :, w - right :] = 0.0
    if chance(0.3):
        for _ in range(int(uniform(1.0, 4.0))):
            mh, mw = max(1, int(h * uniform(0.02, 0.06))), max(1, int(w * uniform(0.02, 0.12)))
            y, x = int(uniform(0.0, h - mh)), int(uniform(0.0, w - mw))
            out[:, y : y + mh, x : x + mw] = uniform(0.85, 1.0)
    return out


class XrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Cached images as float tensors, augmented when training."""

    def __init__(self, cached: CachedImages, *, train: bool, seed: int = 0, views: bool = False) -> None:
        self.cached = cached
        self.train = train
        self.views = views
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.cached.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(self.cached.images[index].astype(np.float32) / 65535.0)[None]
        if self.train:
            image = augment(image, self.generator, views=self.views)
        return image, torch.from_numpy(self.cached.meta[index]), torch.tensor(self.cached.labels[index])


def class_weights(labels: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Per-sample weights that give every present class the same total weight (balanced sampling)."""
    counts = np.bincount(labels, minlength=len(LABELS)).astype(np.float64)
    per_class = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    weights: npt.NDArray[np.float64] = per_class[labels]
    return weights


def mixed_weights(
    labels: npt.NDArray[np.int64], extra: npt.NDArray[np.int64], share: float, *, balanced: bool
) -> npt.NDArray[np.float64]:
    """Sampling weights of ``labels`` followed by ``extra`` (e.g. synthetic images mixed into real
    training) such that ``extra`` gets ``share`` of the draws, classes balanced within each part when
    ``balanced``: the mixed-in images add views without outweighing the real ones."""
    parts = []
    for part, weight in ((labels, 1.0 - share), (extra, share)):
        w = class_weights(part) if balanced else np.ones(len(part), np.float64)
        parts.append(weight * w / max(w.sum(), 1e-12))
    return np.concatenate(parts)


MAX_GROUP_SHARE = 2.0 / 3.0
"""A label's folds are grouped by source only when no source holds more than this share of its images:
leaving the largest out must still leave the model examples of the label to learn from (a label whose
images nearly all come from one collection is split by image, like a single-source label)."""


def _grouped_labels(frame: pd.DataFrame, column: str) -> set[str]:
    """Labels whose images come from several groups, none dominant (see MAX_GROUP_SHARE)."""
    values = frame[column].fillna("(none)").astype(str)
    shares = values.groupby(frame["label"]).value_counts(normalize=True)
    return {str(label) for label, share in shares.groupby(level=0).max().items() if share <= MAX_GROUP_SHARE}


def _deal_by_image(keys: list[str], k: int, rng: np.random.Generator, folds: dict[str, int]) -> None:
    for i, index in enumerate(rng.permutation(len(keys))):
        folds[keys[index]] = i % k


def grouped_folds(frame: pd.DataFrame, column: str, k: int, *, seed: int) -> dict[str, int]:
    """Fold (0..k-1) of each instance: for a label with several values of ``column`` (e.g. the public
    collection an image came from) whole groups go to one fold, so a fold's test images come from a
    source the model did not train on; a label with one (dominant) source is split by image."""
    rng = np.random.default_rng(seed)
    grouped = _grouped_labels(frame, column)
    folds: dict[str, int] = {}
    for label, rows in frame.groupby("label", sort=True):
        if str(label) not in grouped:
            _deal_by_image([str(h) for h in rows["sop_uid_hash"]], k, rng, folds)
            continue
        sizes = rows.groupby(rows[column].fillna("(none)"), sort=True).size().sort_values(ascending=False)
        load = [0] * k
        for group, size in sizes.items():
            fold = min(range(k), key=lambda f: (load[f], f))
            load[fold] += int(size)
            mask = rows[column].fillna("(none)") == group
            folds.update(dict.fromkeys(map(str, rows.loc[mask, "sop_uid_hash"]), fold))
    return folds


def leave_one_group_out(frame: pd.DataFrame, column: str, *, seed: int) -> dict[str, int]:
    """One fold per value of ``column`` among labels that have several (each collection in turn plays
    the unseen hospital); a label with a single (dominant) group is split by image across those folds,
    so every fold still trains on it."""
    rng = np.random.default_rng(seed)
    values = frame[column].fillna("(none)").astype(str)
    grouped = _grouped_labels(frame, column)
    multi = sorted(set(values[frame["label"].astype(str).isin(grouped)]))
    if not multi:
        raise ValueError(f"no label has images from several {column!r} values: nothing to leave out")
    fold_of = {group: i for i, group in enumerate(multi)}
    folds: dict[str, int] = {}
    for label, rows in frame.groupby("label", sort=True):
        keys = [str(h) for h in rows["sop_uid_hash"]]
        if str(label) in grouped:
            folds.update({k: fold_of[str(g)] for k, g in zip(keys, values[rows.index], strict=True)})
        else:
            _deal_by_image(keys, len(multi), rng, folds)
    return folds


def cv_folds(frame: pd.DataFrame, column: str, folds: int | None, *, seed: int) -> dict[str, int]:
    """Fold of each instance: ``folds`` folds grouped by ``column``, or (None) leave-one-group-out:
    one fold per group of a label that has several, so each collection in turn is the unseen one."""
    if folds is not None:
        return grouped_folds(frame, column, folds, seed=seed)
    return leave_one_group_out(frame, column, seed=seed)
