"""Metrics: hand-computed cases, bootstrap intervals that behave, and the contract's ``evaluate`` shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from dicom_router import LABELS
from dicom_router.evaluate import (
    accuracy,
    bootstrap_ci,
    confusion_matrix,
    evaluation_report,
    expected_calibration_error,
    group_report,
    macro_f1,
    per_class,
    plot_confusion_matrix,
    plot_reliability,
    weighted_f1,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Class 0 and 1 are ordinary; class 2 is present (support 2) but never predicted; class 3 is neither
# present nor predicted; class 4 is never present but predicted once.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 1, 4, 0])
CM = np.array(
    [
        [2, 1, 0, 0, 0],
        [0, 2, 0, 0, 0],
        [1, 0, 0, 0, 1],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
)


def _noisy(n: int, accuracy: float, seed: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Balanced labels and predictions that are right with probability ``accuracy``, else uniform."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, n)
    y_pred = np.where(rng.random(n) < accuracy, y_true, rng.integers(0, 5, n))
    return y_true, y_pred


def test_confusion_matrix_puts_truth_in_rows_and_keeps_every_class() -> None:
    cm = confusion_matrix(Y_TRUE, Y_PRED)
    assert cm.dtype == np.int64 and cm.shape == (5, 5)
    np.testing.assert_array_equal(cm, CM)


def test_per_class_scores_match_a_hand_computed_case() -> None:
    scores = per_class(CM)
    # precision = TP / column sum: 2/3, 2/3, 0/0 -> 0, 0/0 -> 0, 0/1 = 0
    np.testing.assert_allclose(scores["precision"], [2 / 3, 2 / 3, 0.0, 0.0, 0.0])
    # recall = TP / row sum: 2/3, 2/2, 0/2, 0/0 -> 0, 0/0 -> 0
    np.testing.assert_allclose(scores["recall"], [2 / 3, 1.0, 0.0, 0.0, 0.0])
    # F1 = 2PR / (P + R): 2/3; 2*(2/3)/(5/3) = 0.8; 0 for the rest
    np.testing.assert_allclose(scores["f1"], [2 / 3, 0.8, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(scores["support"], [3, 2, 2, 0, 0])


def test_macro_f1_matches_a_hand_computed_case() -> None:
    # Class 3 never occurs (no truth, no prediction) so it is left out: (2/3 + 4/5 + 0 + 0) / 4 = 11/30.
    assert macro_f1(CM) == pytest.approx(11 / 30)


def test_macro_f1_of_a_class_set_without_absent_classes_is_the_plain_mean() -> None:
    # 2 classes, cm [[3, 1], [0, 2]]: F1 = 6/7 and 4/5, mean = (30/35 + 28/35) / 2 = 29/35.
    assert macro_f1(np.array([[3, 1], [0, 2]])) == pytest.approx(29 / 35)


def test_weighted_f1_and_accuracy_match_a_hand_computed_case() -> None:
    # weighted: (3 * 2/3 + 2 * 0.8 + 2 * 0) / 7 = 3.6 / 7 = 18/35; accuracy: trace 4 over 7 samples
    assert weighted_f1(CM) == pytest.approx(18 / 35)
    assert accuracy(CM) == pytest.approx(4 / 7)


def test_expected_calibration_error_matches_a_hand_computed_case() -> None:
    probabilities = np.array([[0.9, 0.1], [0.7, 0.3], [0.25, 0.75], [0.55, 0.45]])
    y_true = np.array([0, 1, 1, 0])
    # 5 bins (lo, hi]: conf 0.9 right -> (0.8, 1]: |1 - 0.9| = 0.1, 1 sample;
    # 0.7 wrong and 0.75 right -> (0.6, 0.8]: |0.5 - 0.725| = 0.225, 2 samples;
    # 0.55 right -> (0.4, 0.6]: |1 - 0.55| = 0.45, 1 sample. ECE = (0.1 + 2 * 0.225 + 0.45) / 4 = 0.25.
    assert expected_calibration_error(probabilities, y_true, n_bins=5) == pytest.approx(0.25)
    # One bin: |mean accuracy - mean confidence| = |3/4 - 2.9/4| = 0.025.
    assert expected_calibration_error(probabilities, y_true, n_bins=1) == pytest.approx(0.025)


def test_a_confident_and_always_right_model_has_zero_calibration_error() -> None:
    probabilities = np.eye(5)[[0, 1, 2, 3, 4, 0]]
    assert expected_calibration_error(probabilities, [0, 1, 2, 3, 4, 0]) == 0.0


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        ([], [], "empty"),
        ([0, 1], [0], "differ in length"),
        ([0, 5], [0, 1], "outside"),
        ([0.0, 1.0], [0, 1], "integer"),
    ],
)
def test_bad_label_arrays_are_refused_with_a_clear_message(
    y_true: list[float], y_pred: list[int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        confusion_matrix(y_true, y_pred)


def test_metrics_of_an_empty_confusion_matrix_are_refused() -> None:
    for metric in (per_class, macro_f1, weighted_f1, accuracy):
        with pytest.raises(ValueError, match="empty"):
            metric(np.zeros((5, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="empty"):
        expected_calibration_error(np.empty((0, 5)), np.empty(0, dtype=np.int64))


def test_bootstrap_ci_contains_the_point_estimates() -> None:
    y_true, y_pred = _noisy(600, 0.8, seed=1)
    result = bootstrap_ci(y_true, y_pred, resamples=2_000)
    lo, hi = result.macro_f1
    assert lo < macro_f1(confusion_matrix(y_true, y_pred)) < hi
    for (c_lo, c_hi), f1 in zip(result.f1, per_class(confusion_matrix(y_true, y_pred))["f1"], strict=True):
        assert c_lo < f1 < c_hi
    assert result.resamples == 2_000 and result.confidence == 0.95


def test_bootstrap_ci_is_narrower_with_more_samples() -> None:
    y_true, y_pred = _noisy(200, 0.8, seed=2)
    small = bootstrap_ci(y_true, y_pred, resamples=2_000).macro_f1
    # Ten copies: the same point estimate, ten times the evidence, about 1/sqrt(10) of the width.
    large = bootstrap_ci(np.tile(y_true, 10), np.tile(y_pred, 10), resamples=2_000).macro_f1
    assert large[1] - large[0] < 0.5 * (small[1] - small[0])


def test_bootstrap_ci_is_deterministic_for_a_seed() -> None:
    y_true, y_pred = _noisy(300, 0.7, seed=3)
    first = bootstrap_ci(y_true, y_pred, resamples=1_500, seed=7)
    assert bootstrap_ci(y_true, y_pred, resamples=1_500, seed=7) == first
    assert bootstrap_ci(y_true, y_pred, resamples=1_500, seed=8) != first


def test_bootstrap_ci_of_a_perfect_classifier_is_one_to_one() -> None:
    y_true = np.repeat(np.arange(5), 4)
    result = bootstrap_ci(y_true, y_true, resamples=500)
    assert result.macro_f1 == (1.0, 1.0)
    assert result.f1 == ((1.0, 1.0),) * 5


def test_bootstrap_ci_gives_a_class_that_never_occurs_its_zero_point_estimate() -> None:
    y_true, y_pred = _noisy(100, 0.8, seed=4)
    y_true, y_pred = np.minimum(y_true, 3), np.minimum(y_pred, 3)  # class 4 neither present nor predicted
    assert bootstrap_ci(y_true, y_pred, resamples=200).f1[4] == (0.0, 0.0)


def test_bootstrap_ci_matches_a_per_resample_loop_over_the_same_draws() -> None:
    # With 150 samples one chunk holds 1,000 resamples, so 400 resamples are a single (400, 150) draw from
    # default_rng(seed): a plain loop over the same index rows must give the stacked bincount's percentiles.
    y_true, y_pred = _noisy(150, 0.75, seed=5)
    rows = np.random.default_rng(9).integers(0, 150, size=(400, 150))
    looped = [macro_f1(confusion_matrix(y_true[i], y_pred[i])) for i in rows]
    expected = tuple(np.percentile(looped, [2.5, 97.5]))
    assert bootstrap_ci(y_true, y_pred, resamples=400, seed=9).macro_f1 == pytest.approx(expected)


def test_the_report_has_exactly_the_contract_shape_and_is_json() -> None:
    rng = np.random.default_rng(6)
    y_true = rng.integers(0, 4, 80)  # "others" never present
    probabilities = rng.dirichlet(np.ones(5), 80)
    probabilities[np.arange(80), y_true] += 1.0
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    errors = [{"file": "bad.dcm", "error": {"type": "NotDicom", "message": "no preamble"}}]
    report = evaluation_report(y_true, probabilities, LABELS, ms_per_image=3.5, errors=errors, resamples=300)
    assert list(report) == [
        *("n", "accuracy", "macro_f1", "macro_f1_ci", "weighted_f1", "ece", "ms_per_image", "labels"),
        *("per_class", "confusion_matrix", "errors"),
    ]
    assert report["n"] == 80 and report["labels"] == list(LABELS) and report["errors"] == errors
    assert list(report["per_class"]) == list(LABELS)
    for row in report["per_class"].values():
        assert list(row) == ["precision", "recall", "f1", "support", "f1_ci"]
    assert report["per_class"]["others"]["support"] == 0
    assert len(report["confusion_matrix"]) == 5 and all(len(r) == 5 for r in report["confusion_matrix"])
    lo, hi = report["macro_f1_ci"]
    assert lo <= report["macro_f1"] <= hi
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_the_report_without_errors_lists_none_and_refuses_empty_input() -> None:
    report = evaluation_report([0, 1], np.eye(5)[[0, 1]], LABELS, ms_per_image=1.0, resamples=50)
    assert report["errors"] == [] and report["accuracy"] == 1.0
    with pytest.raises(ValueError, match="empty"):
        evaluation_report([], np.empty((0, 5)), LABELS, ms_per_image=1.0)


def test_the_plots_write_png_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    y_true = rng.integers(0, 5, 60)
    probabilities = rng.dirichlet(np.ones(5), 60)
    cm_path = plot_confusion_matrix(CM, LABELS, tmp_path / "plots" / "cm.png")
    rel_path = plot_reliability(probabilities, y_true, tmp_path / "plots" / "reliability.png")
    for path in (cm_path, rel_path):
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_per_group_report_tells_review_from_misrouting_at_the_threshold() -> None:
    probabilities = np.array(
        [
            [0.9, 0.1, 0, 0, 0],
            [0.2, 0.8, 0, 0, 0],
            [0.6, 0.4, 0, 0, 0],
            [0.1, 0.95, 0, 0, 0],
            [0, 0.3, 0.7, 0, 0],
        ]
    )
    truth = [0, 0, 1, 1, 2]
    report = group_report(["a", "a", "b", "b", "b"], truth, probabilities, LABELS, threshold=0.75)
    a, b = report["a"], report["b"]
    assert a["predicted"] == {LABELS[0]: 1, LABELS[1]: 1} and b["predicted"] == {
        LABELS[0]: 1,
        LABELS[1]: 1,
        LABELS[2]: 1,
    }
    assert a["recall"] == {LABELS[0]: 0.5} and a["at_threshold"]["misrouted"] == 1  # 0.8, wrong: misrouted
    assert b["at_threshold"]["auto_routed"] == 1 and b["at_threshold"]["misrouted"] == 0  # 0.6, 0.7: review
    assert b["at_threshold"]["coverage"] == pytest.approx(1 / 3) and b["accuracy"] == pytest.approx(2 / 3)
    assert "at_threshold" not in group_report(["a"] * 5, truth, probabilities, LABELS)["a"]
