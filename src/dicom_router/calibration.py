"""Calibrated abstention: temperature scaling, risk–coverage, and the review threshold that keeps the
images a router sends on automatically at a target accuracy.

A router should rather send an image to review than misroute it. That is only a safe policy when the
confidence it thresholds means what it says, so the bundle's probabilities are temperature-scaled on
validation data (Guo et al. 2017), and the threshold is chosen on source-grouped cross-validation.
A confident model can still be far from anything it trained on: images whose ``novelty`` is above the
rules' ``review.above_novelty`` are not ``familiar`` and go to review at any threshold, so every figure
here takes that mask too. Pure numpy: evaluation, training and reports share it without a model runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def _softmax(scores: npt.ArrayLike) -> FloatArray:
    z = np.asarray(scores, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = e / e.sum(axis=1, keepdims=True)
    return out


def scaled(scores: npt.ArrayLike, temperature: float) -> FloatArray:
    """Probabilities from log-probability scores divided by ``temperature``."""
    return _softmax(np.asarray(scores, dtype=np.float64) / temperature)


def nll(scores: npt.ArrayLike, labels: npt.ArrayLike, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under the tempered scores."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    y = np.asarray(labels, dtype=np.int64)
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(
    scores: npt.ArrayLike, labels: npt.ArrayLike, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature minimising validation NLL (golden-section search on log T; NLL is unimodal in
    T for fixed scores). 1.0 when there is nothing to fit on."""
    y = np.asarray(labels)
    if len(y) == 0:
        return 1.0
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(scores, y, float(np.exp(a))), nll(scores, y, float(np.exp(b)))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(scores, y, float(np.exp(a)))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(scores, y, float(np.exp(b)))
    return float(np.exp((lo + hi) / 2.0))


def familiar_mask(novelty: npt.ArrayLike | None, above_novelty: float | None) -> npt.NDArray[np.bool_] | None:
    """Which images the novelty check lets through (None: no check, every image may be routed)."""
    if novelty is None or above_novelty is None:
        return None
    return np.asarray(novelty, dtype=np.float64) <= above_novelty


def routable(n: int, familiar: npt.ArrayLike | None) -> npt.NDArray[np.bool_]:
    """Which of ``n`` images a threshold may route: the ``familiar`` ones, or all without a check."""
    return np.ones(n, dtype=bool) if familiar is None else np.asarray(familiar, dtype=bool)


def risk_coverage(
    probabilities: npt.ArrayLike, labels: npt.ArrayLike, familiar: npt.ArrayLike | None = None
) -> dict[str, list[float]]:
    """Auto-routed accuracy and coverage at every confidence threshold (most confident first):
    ``threshold[i]`` keeps the ``familiar`` images with confidence ≥ it (coverage counts all images,
    so with a novelty check it never reaches 1)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    allowed = routable(len(p), familiar)
    confidence = p.max(axis=1)[allowed]
    order = np.argsort(-confidence, kind="stable")
    correct = (p.argmax(axis=1) == y)[allowed][order].astype(np.float64)
    kept = np.arange(1, len(correct) + 1, dtype=np.float64)
    return {
        "threshold": confidence[order].tolist(),
        "coverage": (kept / max(len(y), 1)).tolist(),
        "accuracy": (np.cumsum(correct) / kept).tolist(),
    }


def at_threshold(
    probabilities: npt.ArrayLike,
    labels: npt.ArrayLike,
    threshold: float,
    familiar: npt.ArrayLike | None = None,
) -> dict[str, float]:
    """What a router with ``review.below_confidence = threshold`` (and the novelty check that gave
    ``familiar``) does: the share it routes automatically (coverage) and how often those are right."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    kept = (p.max(axis=1) >= threshold) & routable(len(p), familiar)
    n = int(kept.sum())
    right = int((p.argmax(axis=1)[kept] == y[kept]).sum())
    return {
        "threshold": float(threshold),
        "coverage": n / max(len(y), 1),
        "auto_routed": float(n),
        "auto_routed_accuracy": right / n if n else 1.0,
        "misrouted": float(n - right),
    }


def threshold_for(
    probabilities: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    target: float = 0.99,
    familiar: npt.ArrayLike | None = None,
) -> float:
    """The lowest confidence threshold whose auto-routed accuracy is at least ``target`` (so coverage
    is as high as that accuracy allows); 1.0 when no threshold reaches it."""
    curve = risk_coverage(probabilities, labels, familiar)
    thresholds = curve["threshold"]
    best = 1.0
    for i, (threshold, accuracy) in enumerate(zip(thresholds, curve["accuracy"], strict=True)):
        last_of_tie = i + 1 == len(thresholds) or thresholds[i + 1] < threshold
        if last_of_tie and accuracy >= target:
            best = threshold
    return float(best)


def abstention_report(
    probabilities: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    threshold: float,
    target: float = 0.99,
    points: int = 50,
    familiar: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """The ``abstention`` part of an evaluation report: at the given review threshold, the threshold
    that reaches ``target`` auto-routed accuracy on these images, and the risk–coverage curve (about
    ``points`` points, the full coverage last); with ``familiar``, the share the novelty check sends
    to review (``unfamiliar``), every figure after it, and the review threshold's figures without it."""
    chosen = threshold_for(probabilities, labels, target=target, familiar=familiar)
    curve = risk_coverage(probabilities, labels, familiar)
    step = max(1, len(curve["threshold"]) // points)
    keep = sorted({*range(step - 1, len(curve["threshold"]), step), len(curve["threshold"]) - 1} - {-1})
    n = len(np.asarray(labels))
    check = (
        {} if familiar is None else {"without_novelty_check": at_threshold(probabilities, labels, threshold)}
    )
    return {
        "unfamiliar": 0.0 if familiar is None else float(n - np.count_nonzero(familiar)) / max(n, 1),
        "at_review_threshold": at_threshold(probabilities, labels, threshold, familiar),
        **check,
        "target_accuracy": target,
        "threshold_for_target": chosen,
        "at_threshold_for_target": at_threshold(probabilities, labels, chosen, familiar),
        "risk_coverage": {key: [values[i] for i in keep] for key, values in curve.items()},
    }
