"""What drift monitoring compares: per-image statistics, a fixed embedding projection, the column sets.

Everything here is a pure function of one image or one embedding, so the routing worker (inference log)
and the reference profile (training images) compute exactly the same numbers without sharing state.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt

STAT_NAMES: tuple[str, ...] = ("mean", "std", "p1", "p5", "p50", "p95", "p99", "entropy", "aspect", "spacing")
"""Keys of ``image_statistics`` (log columns ``img_<name>``)."""
HISTOGRAM_LEVELS = 4096
"""Percentiles come from a histogram of this many grey levels (O(pixels), no sort): 0.025 % resolution
is far below anything a drift test can see, and a 3000x3000 radiograph costs ~20 ms instead of ~300 ms."""
ENTROPY_BINS = 256
MAX_STAT_PIXELS = 1 << 20
"""Larger images are read on a regular grid of at most this many pixels (every s-th row and column):
grey-level statistics of a 3000x2500 radiograph move by < 0.001 and the routing path saves ~100 ms."""

PROJECTION_DIM = 8
PROJECTION_SEED = 20_240_606
"""The embedding projection is a Gaussian random matrix drawn from ``(PROJECTION_SEED, D, k)``: the
same for every process that sees a D-wide embedding, so the reference and the live log agree without
fitting or storing anything. Entries are N(0, 1/D), so a projected value has the scale of the embedding's
root-mean-square (Johnson-Lindenstrauss: distances between embeddings are kept up to a constant)."""

EMBEDDING_COLUMNS: tuple[str, ...] = tuple(f"emb_{i}" for i in range(PROJECTION_DIM))
IMAGE_COLUMNS: tuple[str, ...] = tuple(f"img_{name}" for name in STAT_NAMES if name != "spacing")
"""Monitored image statistics; ``img_spacing`` is logged but not tested twice (``pixel_spacing`` is)."""
METADATA_CATEGORICAL: tuple[str, ...] = (
    "modality",
    "manufacturer",
    "model_name",
    "photometric",
    "transfer_syntax",
    "bits_stored",
    "view_position",
    "sex",
)
METADATA_NUMERICAL: tuple[str, ...] = ("pixel_spacing", "kvp", "exposure", "rows", "columns", "age_years")
PREDICTION_CATEGORICAL: tuple[str, ...] = ("pred_label",)
PREDICTION_NUMERICAL: tuple[str, ...] = ("confidence", "novelty")
"""``novelty`` is tested like any column: a hospital whose images the model does not know moves it
(and, where the bundle computes none, it is null and not tested)."""

COLUMN_SETS: dict[str, tuple[str, ...]] = {
    "metadata": METADATA_CATEGORICAL + METADATA_NUMERICAL,
    "image": IMAGE_COLUMNS,
    "prediction": PREDICTION_CATEGORICAL + PREDICTION_NUMERICAL,
    "embedding": EMBEDDING_COLUMNS,
}
"""The columns each drift report tests, by set; alert rules choose which sets count."""
CATEGORICAL_COLUMNS: frozenset[str] = frozenset(METADATA_CATEGORICAL + PREDICTION_CATEGORICAL)
"""Tested as categories (chi-square / Z-test / Jensen-Shannon); every other monitored column as numbers."""


def image_statistics(pixels: npt.NDArray[np.float32], spacing: float | None) -> dict[str, float]:
    """Grey-level facts of the displayed image (float32 in [0, 1], bone bright, padding black).

    Percentiles come from a ``HISTOGRAM_LEVELS`` histogram, entropy (bits) from a 256-bin one, all on at
    most ``MAX_STAT_PIXELS`` pixels; aspect is rows / columns; spacing is the pixel spacing in mm (NaN
    when unknown). Padding counts: a reader that starts padding its plate border is drift too.
    """
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {pixels.shape}")
    stride = max(1, math.ceil(math.sqrt(pixels.size / MAX_STAT_PIXELS)))
    values = np.clip(pixels[::stride, ::stride], 0.0, 1.0).ravel()
    levels = (values * (HISTOGRAM_LEVELS - 1) + 0.5).astype(np.uint16)
    counts = np.bincount(levels, minlength=HISTOGRAM_LEVELS)
    cdf = np.cumsum(counts) / values.size
    percentiles = {
        f"p{q}": float(np.searchsorted(cdf, q / 100.0) / (HISTOGRAM_LEVELS - 1)) for q in (1, 5, 50, 95, 99)
    }
    coarse = counts.reshape(ENTROPY_BINS, -1).sum(axis=1) / values.size
    nonzero = coarse[coarse > 0]
    rows, columns = pixels.shape
    return {
        "mean": float(values.mean(dtype=np.float64)),
        "std": float(values.std(dtype=np.float64)),
        **percentiles,
        "entropy": float(-(nonzero * np.log2(nonzero)).sum()),
        "aspect": rows / columns,
        "spacing": float(spacing) if spacing is not None and math.isfinite(spacing) else math.nan,
    }


@lru_cache(maxsize=8)
def projection_matrix(dim: int, k: int = PROJECTION_DIM) -> npt.NDArray[np.float32]:
    """The fixed ``[dim, k]`` Gaussian projection for ``dim``-wide embeddings (see ``PROJECTION_SEED``)."""
    if dim < 1 or k < 1:
        raise ValueError(f"projection needs positive sizes, got {dim}x{k}")
    rng = np.random.default_rng([PROJECTION_SEED, dim, k])
    matrix = (rng.standard_normal((dim, k)) / math.sqrt(dim)).astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def project_embedding(embedding: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """``[n, D]`` bundle embeddings → ``[n, PROJECTION_DIM]`` (columns ``emb_0..emb_7``)."""
    if embedding.ndim != 2:
        raise ValueError(f"expected embeddings [n, D], got shape {embedding.shape}")
    projected: npt.NDArray[np.float32] = embedding.astype(np.float32) @ projection_matrix(embedding.shape[1])
    return projected


def monitored_columns(sets: tuple[str, ...] | list[str]) -> list[str]:
    """The columns of the named sets, in set order; unknown set names are an error."""
    unknown = [s for s in sets if s not in COLUMN_SETS]
    if unknown:
        raise ValueError(f"unknown column sets {unknown}; known: {', '.join(COLUMN_SETS)}")
    return [column for s in sets for column in COLUMN_SETS[s]]
