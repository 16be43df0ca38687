"""The novelty score: a shrunk Mahalanobis distance to the nearest class, 1.0 at the held-out edge."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_router.novelty import QUANTILE, SHRINKAGE, fit_novelty, novelty_of


def _clusters(rng: np.random.Generator, n: int, dim: int = 48) -> tuple[np.ndarray, np.ndarray]:
    centres = np.eye(5, dim) * 6.0
    labels = np.arange(n) % 5
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def test_held_out_images_of_the_training_sources_score_mostly_below_one_and_a_new_view_far_above() -> None:
    rng = np.random.default_rng(0)
    train, labels = _clusters(rng, 200)
    held_out, _ = _clusters(rng, 100)
    fit = fit_novelty(train, labels, held_out)
    assert np.mean(novelty_of(fit, held_out) <= 1.0) == pytest.approx(QUANTILE, abs=0.01)
    fresh, _ = _clusters(rng, 400)  # more of the same: familiar at about the same rate
    assert np.mean(novelty_of(fit, fresh) <= 1.0) > 0.85
    unlike = held_out[:10] + np.eye(10, 48, k=20) * 20.0  # a direction no training image varies in
    assert (novelty_of(fit, unlike) > 2.0).all()


def test_the_stored_directions_give_the_full_shrunk_mahalanobis_distance() -> None:
    rng = np.random.default_rng(1)
    train, labels = _clusters(rng, 30, dim=64)  # fewer images than dimensions: the covariance is singular
    queries = rng.normal(size=(7, 64)).astype(np.float64) * 3.0
    fit = fit_novelty(train, labels, train[:10])
    means = np.stack([train[labels == c].mean(axis=0) for c in range(5)]).astype(np.float64)
    sample = np.cov((train - means[labels]).T)
    shrunk = (1 - SHRINKAGE) * sample + SHRINKAGE * np.trace(sample) / 64 * np.eye(64)
    precision = np.linalg.inv(shrunk)

    def squared(x: np.ndarray) -> np.ndarray:
        per_class = np.stack([np.einsum("ij,jk,ik->i", x - m, precision, x - m) for m in means])
        nearest: np.ndarray = per_class.min(axis=0)
        return nearest

    assert fit.directions.shape[1] < 64  # rank of the sample covariance, not D
    expected = squared(queries) / np.quantile(squared(train[:10].astype(np.float64)), QUANTILE)
    np.testing.assert_allclose(novelty_of(fit, queries), expected, rtol=1e-3)


def test_a_fit_without_held_out_images_is_refused() -> None:
    rng = np.random.default_rng(2)
    train, labels = _clusters(rng, 20)
    with pytest.raises(ValueError, match="held-out"):
        fit_novelty(train, labels, train[:0])
