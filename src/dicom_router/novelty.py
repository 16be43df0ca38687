"""How unlike the training images an image is: a Mahalanobis distance in the model's embedding, so
the router can send a view no training image showed to review even when the classifier is sure.

A softmax is confident far from its training data (a cervical-spine lateral is called ``others`` with
probability 1.00 when the nearest thing the model saw is a lateral skull); its distance to every class
says it is new. The fit (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution
samples"): class means of the training embeddings and one covariance shared by the classes, shrunk
halfway to a scaled identity because a few hundred images cannot estimate a 1,280-wide covariance.
The score is the squared distance to the nearest class mean divided by the 95th percentile of the
same distance on held-out images of the training sources (the validation split): 1.0 is the edge of
what the model knows, above it one in twenty familiar images and most unfamiliar ones.

The covariance has the rank of the training set plus a constant floor, so the distance is stored as
that many directions and their spread, not a D×D matrix: a megabyte inside the ONNX graph rather than
six. In collection-grouped cross-validation of MobileNet-V2 (three deals of the folds), reviewing
images above 1.0 cut the images misrouted at a 0.95 review threshold from 5 to 3, 3 to 2 and 4 to 2,
for 6 to 11 points of coverage (README, "Training").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

SHRINKAGE = 0.5
"""The weight of the scaled identity in the shared covariance (0.1 and 0.5 flagged the same errors)."""
QUANTILE = 0.95
"""The share of held-out familiar images whose score stays at or below 1.0."""


@dataclass(frozen=True)
class NoveltyFit:
    """What the score needs: class means ``[C, D]``, the sample covariance's leading directions
    ``[D, R]`` with their shrunk variances ``[R]``, the variance ``floor`` of every other direction,
    and the ``scale`` (the quantile of held-out squared distances) that makes 1.0 the edge."""

    means: npt.NDArray[np.float32]
    directions: npt.NDArray[np.float32]
    variances: npt.NDArray[np.float32]
    floor: float
    scale: float


class Novelty(nn.Module):
    """Embeddings ``[B, D]`` → novelty ``[B]`` (the bundle's third output, computed in its graph)."""

    def __init__(self, fit: NoveltyFit) -> None:
        super().__init__()
        self.means: torch.Tensor
        self.directions: torch.Tensor
        self.variances: torch.Tensor
        self.register_buffer("means", torch.from_numpy(fit.means))
        self.register_buffer("directions", torch.from_numpy(fit.directions))
        self.register_buffer("variances", torch.from_numpy(fit.variances))
        self.floor = fit.floor
        self.scale = fit.scale

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        centred = embedding.float()[:, None, :] - self.means[None]  # [B, C, D]
        along = centred @ self.directions  # [B, C, R]
        rest = (centred * centred).sum(-1) - (along * along).sum(-1)
        squared = (along * along / self.variances).sum(-1) + rest.clamp(min=0.0) / self.floor
        return squared.min(dim=1).values / self.scale


def fit_novelty(
    embeddings: npt.ArrayLike, labels: npt.ArrayLike, held_out: npt.ArrayLike, *, n_classes: int = 5
) -> NoveltyFit:
    """Fit on training ``embeddings`` and their ``labels``; scale on ``held_out`` embeddings of the same
    sources (images the model did not train on, so their distances are what a familiar new image gets)."""
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    reference = np.asarray(held_out, dtype=np.float32)
    if len(x) < 2 or len(reference) == 0:
        raise ValueError("fitting novelty needs at least two training and one held-out embedding")
    dim = x.shape[1]
    present = [c for c in range(n_classes) if (y == c).any()]
    means = np.stack([x[y == c].mean(axis=0) for c in present])
    centred = x - means[np.searchsorted(present, y)]
    # eigen-directions of the sample covariance from the thin SVD: rank ≤ n, not D
    _, singular, vt = np.linalg.svd(centred / np.sqrt(len(x) - 1), full_matrices=False)
    sample = singular**2
    floor = SHRINKAGE * float(sample.sum()) / dim
    keep = sample > 1e-12 * max(float(sample.max()), 1e-30)
    unscaled = NoveltyFit(
        means.astype(np.float32),
        np.ascontiguousarray(vt[keep].T, dtype=np.float32),
        ((1.0 - SHRINKAGE) * sample[keep] + floor).astype(np.float32),
        floor,
        1.0,
    )
    scale = float(np.quantile(novelty_of(unscaled, reference), QUANTILE))
    return replace(unscaled, scale=max(scale, 1e-12))


def novelty_of(fit: NoveltyFit, embeddings: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The score of each embedding row, as the bundle computes it."""
    with torch.no_grad():
        out: npt.NDArray[np.float32] = Novelty(fit)(
            torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
        ).numpy()
    return out
