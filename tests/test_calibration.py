"""Temperature scaling and the review threshold: a router sends to review what it is unsure of."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_router.calibration import (
    abstention_report,
    at_threshold,
    familiar_mask,
    fit_temperature,
    nll,
    risk_coverage,
    scaled,
    threshold_for,
)


def _sampled(temperature: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose labels are drawn from softmax(scores / temperature): that temperature is the truth."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 3.0, (n, 5))
    p = scaled(scores, temperature)
    labels = np.array([rng.choice(5, p=row) for row in p])
    return scores, labels


@pytest.mark.parametrize("truth", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_recovers_the_one_that_generated_the_labels(truth: float) -> None:
    scores, labels = _sampled(truth)
    fitted = fit_temperature(scores, labels)
    assert fitted == pytest.approx(truth, rel=0.1)
    assert nll(scores, labels, fitted) <= nll(scores, labels, 1.0) + 1e-9


def test_an_overconfident_model_gets_a_temperature_above_one() -> None:
    scores, labels = _sampled(3.0)
    assert fit_temperature(scores, labels) > 2.0
    assert fit_temperature(np.zeros((0, 5)), np.zeros(0, dtype=int)) == 1.0


def test_at_threshold_counts_what_is_routed_and_what_is_misrouted() -> None:
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45]])
    y = np.array([0, 1, 1, 0])
    at = at_threshold(p, y, 0.7)
    assert at["coverage"] == 0.5 and at["auto_routed"] == 2
    assert at["auto_routed_accuracy"] == 0.5 and at["misrouted"] == 1
    assert at_threshold(p, y, 0.99)["auto_routed_accuracy"] == 1.0  # nothing routed, nothing wrong


def test_the_threshold_for_a_target_accuracy_keeps_as_much_coverage_as_it_allows() -> None:
    p = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.35, 0.65], [0.4, 0.6]])
    y = np.array([0, 0, 1, 1, 0])  # the least confident one is wrong
    assert threshold_for(p, y, target=0.99) == pytest.approx(0.65)
    assert threshold_for(p, y, target=0.8) == pytest.approx(0.6)
    curve = risk_coverage(p, y)
    assert curve["coverage"][-1] == 1.0 and curve["accuracy"][-1] == pytest.approx(0.8)
    report = abstention_report(p, y, threshold=0.5, target=0.99)
    assert report["at_review_threshold"]["coverage"] == 1.0
    assert report["at_threshold_for_target"]["auto_routed_accuracy"] == 1.0
    assert report["risk_coverage"]["coverage"][-1] == 1.0
    assert len(report["risk_coverage"]["threshold"]) == len(p)
    thinned = abstention_report(np.tile(p, (40, 1)), np.tile(y, 40), threshold=0.5, points=10)
    assert (
        10 <= len(thinned["risk_coverage"]["coverage"]) <= 11
        and thinned["risk_coverage"]["coverage"][-1] == 1.0
    )


def test_tied_confidences_are_kept_or_dropped_together() -> None:
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])
    y = np.array([0, 1, 1])  # one of the two tied at 0.9 is wrong
    assert threshold_for(p, y, target=0.99) == 1.0  # the tie cannot be split: route nothing
    assert at_threshold(p, y, 1.0)["auto_routed"] == 0
    assert threshold_for(p, y, target=0.6) == pytest.approx(0.8)  # all three: 2 of 3 right


def test_unfamiliar_images_go_to_review_at_every_threshold_and_coverage_counts_them() -> None:
    p = np.array([[0.99, 0.01], [0.98, 0.02], [0.9, 0.1], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])  # the second is confidently wrong, and unlike the training images
    familiar = familiar_mask([0.4, 1.7, 0.9, 1.0], 1.0)
    assert familiar is not None and familiar.tolist() == [True, False, True, True]
    assert familiar_mask([0.4, 1.7], None) is None and familiar_mask(None, 1.0) is None
    at = at_threshold(p, y, 0.5, familiar)
    assert at["auto_routed"] == 3 and at["misrouted"] == 0 and at["coverage"] == 0.75
    assert at_threshold(p, y, 0.5)["misrouted"] == 1  # without the check it would go out
    assert threshold_for(p, y, target=0.99, familiar=familiar) == pytest.approx(0.7)
    assert threshold_for(p, y, target=0.99) == pytest.approx(0.99)
    curve = risk_coverage(p, y, familiar)
    assert curve["coverage"][-1] == 0.75 and curve["accuracy"][-1] == 1.0
    report = abstention_report(p, y, threshold=0.95, familiar=familiar)
    assert report["unfamiliar"] == 0.25 and report["at_review_threshold"]["auto_routed"] == 1
    assert report["without_novelty_check"]["auto_routed"] == 2  # and one of them misrouted
    assert report["without_novelty_check"]["misrouted"] == 1
