"""Classification metrics for the body-part model: pure numpy, vectorised, no torch and no I/O but PNG plots.

Conventions (the same everywhere, so the report, the bootstrap and the promotion gate agree):

* Confusion matrices have true labels in rows and predictions in columns, every class always present.
* A ratio with a zero denominator is 0.0: precision of a class never predicted, recall of a class never
  present, F1 when precision + recall is 0. This keeps per-class tables fully numeric (JSON has no NaN).
* Macro-F1 averages over the classes that occur in ``y_true`` or ``y_pred`` (scikit-learn's default label
  set): a class missing from a small evaluation set and never predicted has no defined F1 and is not
  counted as a 0. Its per-class row still appears, with support 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

from dicom_router.calibration import abstention_report, at_threshold, risk_coverage, routable

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_MAX_CHUNK = 1_000
"""Most resamples per vectorised bootstrap step: plenty to amortise numpy's per-call cost on small sets."""
_CHUNK_ELEMENTS = 262_144
"""Resample indices held at once (2 MiB of int64): bounds memory, and keeping a chunk cache-sized made
2,500 x 10,000 about 1.5x faster than 1,000-resample chunks (32 MB) on the 2-core dev machine."""


class PerClass(TypedDict):
    """Per-class scores, each an array in label order."""

    precision: FloatArray
    recall: FloatArray
    f1: FloatArray
    support: IntArray


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile confidence intervals from resampling the evaluation set with replacement."""

    macro_f1: tuple[float, float]
    f1: tuple[tuple[float, float], ...]
    """One (lo, hi) per class, in label order."""
    resamples: int
    confidence: float


def _labels(values: npt.ArrayLike, name: str, n_classes: int) -> IntArray:
    """Validated 1-D class indices in ``[0, n_classes)``."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: metrics need at least one sample")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    if array.min() < 0 or array.max() >= n_classes:
        raise ValueError(f"{name} holds class indices outside [0, {n_classes}): {array.min()}..{array.max()}")
    return array.astype(np.int64, copy=False)


def _pair(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int) -> tuple[IntArray, IntArray]:
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1, got {n_classes}")
    true = _labels(y_true, "y_true", n_classes)
    pred = _labels(y_pred, "y_pred", n_classes)
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {true.size} vs {pred.size}")
    return true, pred


def _matrix(cm: npt.ArrayLike) -> IntArray:
    """A validated, non-empty confusion matrix."""
    matrix = np.asarray(cm)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"a confusion matrix must be square and non-empty, got shape {matrix.shape}")
    if not np.issubdtype(matrix.dtype, np.integer):
        raise ValueError(f"a confusion matrix holds integer counts, got dtype {matrix.dtype}")
    if (matrix < 0).any():
        raise ValueError("a confusion matrix holds counts, found a negative entry")
    if matrix.sum() == 0:
        raise ValueError("the confusion matrix is empty: metrics need at least one sample")
    return matrix.astype(np.int64, copy=False)


def _safe_divide(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
    """``numerator / denominator`` with 0.0 where the denominator is 0 (the module's convention)."""
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _scores(cm: IntArray) -> tuple[FloatArray, FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """Precision, recall, F1 and "class occurs" for one ``[k, k]`` or stacked ``[..., k, k]`` matrices."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    support = cm.sum(axis=-1).astype(np.float64)
    predicted = cm.sum(axis=-2).astype(np.float64)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    # 2PR / (P + R) equals 2TP / (support + predicted), which has no 0/0 beyond the absent-class case.
    f1 = _safe_divide(2.0 * tp, support + predicted)
    return precision, recall, f1, (support + predicted) > 0


def _macro(f1: FloatArray, occurs: npt.NDArray[np.bool_]) -> FloatArray:
    """Mean F1 over the classes that occur (last axis); every non-empty matrix has at least one."""
    return np.asarray((f1 * occurs).sum(axis=-1) / occurs.sum(axis=-1), dtype=np.float64)


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int = 5) -> IntArray:
    """Counts with true labels in rows and predictions in columns; absent classes keep their zero rows."""
    true, pred = _pair(y_true, y_pred, n_classes)
    counts = np.bincount(true * n_classes + pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64, copy=False)


def per_class(cm: npt.ArrayLike) -> PerClass:
    """Precision, recall, F1 and support per class; undefined ratios are 0.0 (see the module docstring)."""
    matrix = _matrix(cm)
    precision, recall, f1, _ = _scores(matrix)
    return PerClass(precision=precision, recall=recall, f1=f1, support=matrix.sum(axis=1))


def macro_f1(cm: npt.ArrayLike) -> float:
    """Unweighted mean F1 over the classes present in the truth or the predictions."""
    _, _, f1, occurs = _scores(_matrix(cm))
    return float(_macro(f1, occurs))


def weighted_f1(cm: npt.ArrayLike) -> float:
    """Support-weighted mean F1: what a sample drawn from this evaluation set experiences."""
    matrix = _matrix(cm)
    _, _, f1, _ = _scores(matrix)
    support = matrix.sum(axis=1)
    return float((f1 * support).sum() / support.sum())


def accuracy(cm: npt.ArrayLike) -> float:
    """Fraction of samples on the diagonal."""
    matrix = _matrix(cm)
    return float(np.trace(matrix) / matrix.sum())


def _calibration_bins(
    probabilities: npt.ArrayLike, y_true: npt.ArrayLike, n_bins: int
) -> tuple[IntArray, FloatArray, FloatArray]:
    """Per equal-width confidence bin ``(lo, hi]``: sample count, summed top-label confidence, hits."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"probabilities must be [n, k], got shape {probs.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    true = _labels(y_true, "y_true", probs.shape[1])
    if true.size != probs.shape[0]:
        raise ValueError(f"probabilities have {probs.shape[0]} rows but y_true has {true.size} labels")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities hold NaN or infinite values")
    confidence = probs.max(axis=1)
    hits = (probs.argmax(axis=1) == true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    return (
        np.bincount(bins, minlength=n_bins).astype(np.int64),
        np.bincount(bins, weights=confidence, minlength=n_bins).astype(np.float64),
        np.bincount(bins, weights=hits, minlength=n_bins).astype(np.float64),
    )


def expected_calibration_error(
    probabilities: npt.ArrayLike, y_true: npt.ArrayLike, n_bins: int = 15
) -> float:
    """Top-label ECE: the sample-weighted gap between accuracy and mean confidence per confidence bin."""
    counts, confidence, hits = _calibration_bins(probabilities, y_true, n_bins)
    return float(np.abs(hits - confidence).sum() / counts.sum())


def percentile_interval(values: FloatArray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap resamples' statistics."""
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_ci(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    n_classes: int = 5,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Percentile CIs of macro-F1 and of each class's F1, all resamples' matrices built at once per chunk.

    A class's interval uses only the resamples in which it occurs (true or predicted), matching how
    macro-F1 treats absent classes; a class that never occurs gets (0.0, 0.0), its point estimate.
    """
    true, pred = _pair(y_true, y_pred, n_classes)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n, cells = true.size, n_classes * n_classes
    codes = true * n_classes + pred
    chunk = max(1, min(_MAX_CHUNK, _CHUNK_ELEMENTS // n))
    rng = np.random.default_rng(seed)
    f1 = np.empty((resamples, n_classes))
    occurs = np.empty((resamples, n_classes), dtype=np.bool_)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        drawn = codes[rng.integers(0, n, size=(size, n))]
        drawn += (np.arange(size, dtype=np.int64) * cells)[:, None]
        matrices = np.bincount(drawn.ravel(), minlength=size * cells).reshape(size, n_classes, n_classes)
        _, _, f1[start : start + size], occurs[start : start + size] = _scores(matrices)
    per_class_ci = tuple(
        percentile_interval(f1[occurs[:, c], c], confidence) if occurs[:, c].any() else (0.0, 0.0)
        for c in range(n_classes)
    )
    return BootstrapResult(
        macro_f1=percentile_interval(_macro(f1, occurs), confidence),
        f1=per_class_ci,
        resamples=resamples,
        confidence=confidence,
    )


def evaluation_report(
    y_true: npt.ArrayLike,
    probabilities: npt.ArrayLike,
    labels: Sequence[str],
    ms_per_image: float,
    errors: list[dict[str, Any]] | None = None,
    resamples: int = 10_000,
    seed: int = 0,
    review_threshold: float | None = None,
    familiar: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """The contract's ``evaluate`` JSON document (plain Python types); predictions are the argmax.

    With ``review_threshold`` (the rules' ``review.below_confidence``) it also says how many images a
    router would send on automatically and how often those are right (``abstention``), the images not
    ``familiar`` (novelty above the rules' limit) going to review."""
    k = len(labels)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != k:
        raise ValueError(f"probabilities must be [n, {k}] for {k} labels, got shape {probs.shape}")
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, k)
    scores = per_class(cm)
    ci = bootstrap_ci(y_true, y_pred, k, resamples=resamples, seed=seed)
    return {
        "n": int(cm.sum()),
        "accuracy": accuracy(cm),
        "macro_f1": macro_f1(cm),
        "macro_f1_ci": list(ci.macro_f1),
        "weighted_f1": weighted_f1(cm),
        "ece": expected_calibration_error(probs, y_true),
        "ms_per_image": float(ms_per_image),
        "labels": list(labels),
        "per_class": {
            label: {
                "precision": float(scores["precision"][c]),
                "recall": float(scores["recall"][c]),
                "f1": float(scores["f1"][c]),
                "support": int(scores["support"][c]),
                "f1_ci": list(ci.f1[c]),
            }
            for c, label in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
        "errors": list(errors or []),
        **(
            {"abstention": abstention_report(probs, y_true, threshold=review_threshold, familiar=familiar)}
            if review_threshold is not None
            else {}
        ),
    }


def group_report(
    groups: Sequence[str],
    y_true: npt.ArrayLike,
    probabilities: npt.ArrayLike,
    labels: Sequence[str],
    *,
    threshold: float | None = None,
    familiar: npt.ArrayLike | None = None,
) -> dict[str, dict[str, Any]]:
    """Per group (e.g. the source collection that played the unseen hospital): size, accuracy, the
    recall of each label present in it and what its images were called; with the review ``threshold``,
    what a router does with the group (``at_threshold``): an unseen hospital's hard images should go to
    review, not be misrouted (``familiar``: what the novelty check lets through)."""
    truth = np.asarray(y_true, dtype=np.int64)
    allowed = routable(len(truth), familiar)
    scores = np.asarray(probabilities)
    predicted = scores.argmax(axis=1)
    names = np.asarray(groups, dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for group in sorted(set(names.tolist())):
        rows = names == group
        t, p = truth[rows], predicted[rows]
        out[str(group)] = {
            "n": int(rows.sum()),
            "accuracy": float((t == p).mean()),
            "recall": {labels[c]: float((p[t == c] == c).mean()) for c in sorted(set(t.tolist()))},
            "predicted": {labels[c]: int((p == c).sum()) for c in sorted(set(p.tolist()))},
        }
        if threshold is not None:
            out[str(group)]["at_threshold"] = at_threshold(scores[rows], t, threshold, allowed[rows])
            out[str(group)]["unfamiliar"] = int((~allowed[rows]).sum())
    return out


def plot_risk_coverage(
    probabilities: npt.ArrayLike,
    y_true: npt.ArrayLike,
    path: Path,
    *,
    threshold: float | None = None,
    familiar: npt.ArrayLike | None = None,
) -> Path:
    """PNG risk–coverage curve: accuracy of the images routed automatically against the share routed,
    with the review threshold marked, so the price of each point of accuracy is visible."""
    from matplotlib.figure import Figure

    curve = risk_coverage(probabilities, y_true, familiar)
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(curve["coverage"], curve["accuracy"], color="tab:blue", label="auto-routed accuracy")
    if threshold is not None:
        point = at_threshold(probabilities, y_true, threshold, familiar)
        ax.scatter(
            [point["coverage"]],
            [point["auto_routed_accuracy"]],
            color="tab:red",
            zorder=3,
            label=f"review below {threshold:.2f}: coverage {point['coverage']:.2f}, "
            f"accuracy {point['auto_routed_accuracy']:.3f}",
        )
    ax.axhline(0.99, linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("coverage (share routed without review)")
    ax.set_ylabel("accuracy of auto-routed images")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(max(0.0, min(curve["accuracy"] or [0.0]) - 0.05), 1.005)
    ax.legend(loc="lower left", fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def plot_confusion_matrix(cm: npt.ArrayLike, labels: Sequence[str], path: Path) -> Path:
    """PNG of the counts, coloured by the fraction of each true row so rare classes read as clearly."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no pyplot state

    matrix = _matrix(cm)
    k = matrix.shape[0]
    if len(labels) != k:
        raise ValueError(f"{len(labels)} labels for a {k}x{k} confusion matrix")
    support = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    fraction = _safe_divide(matrix.astype(np.float64), support)
    side = 1.2 + 1.0 * k
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    for (row, col), count in np.ndenumerate(matrix):
        colour = "white" if fraction[row, col] > 0.5 else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=11)
    ax.set_xticks(range(k), list(labels), rotation=35, ha="right")
    ax.set_yticks(range(k), list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (n = {int(matrix.sum())})")
    fig.colorbar(image, ax=ax, label="fraction of the true row")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def plot_reliability(
    probabilities: npt.ArrayLike, y_true: npt.ArrayLike, path: Path, n_bins: int = 15
) -> Path:
    """PNG reliability diagram: accuracy per confidence bin against the diagonal, the gap shaded, ECE in
    the title, so over- and under-confidence are visible at a glance."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no pyplot state

    counts, confidence, hits = _calibration_bins(probabilities, y_true, n_bins)
    ece = float(np.abs(hits - confidence).sum() / counts.sum())
    filled = counts > 0
    accuracy_per_bin = _safe_divide(hits, counts.astype(np.float64))
    confidence_per_bin = _safe_divide(confidence, counts.astype(np.float64))
    width = 1.0 / n_bins
    lefts = np.arange(n_bins) * width
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", label="perfect calibration")
    ax.bar(
        lefts[filled],
        accuracy_per_bin[filled],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.5,
        label="accuracy",
    )
    # Hatched outlines, not fills: an under-confident bin's gap lies over its accuracy bar and stays legible.
    ax.bar(
        lefts[filled],
        (confidence_per_bin - accuracy_per_bin)[filled],
        bottom=accuracy_per_bin[filled],
        width=width,
        align="edge",
        fill=False,
        hatch="//",
        edgecolor="tab:red",
        linewidth=0.8,
        label="gap to mean confidence",
    )
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE = {ece:.4f}, n = {int(counts.sum())}, {n_bins} bins)")
    ax.legend(loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path
