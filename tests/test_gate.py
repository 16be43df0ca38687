"""The promotion gate's rule, as a pure function."""

from __future__ import annotations

from dicom_router import LABELS
from dicom_router.registry import Scores, decide


def _scores(version: str, macro: float, **recall: float) -> Scores:
    return Scores(version, macro, {label: recall.get(label, 0.9) for label in LABELS})


def test_the_first_model_needs_the_floor() -> None:
    assert decide(_scores("1", 0.85), None, margin=0.02, floor=0.80)[0] is True
    promoted, reason = decide(_scores("1", 0.79), None, margin=0.02, floor=0.80)
    assert promoted is False and "floor" in reason


def test_a_better_candidate_replaces_the_champion() -> None:
    promoted, reason = decide(_scores("2", 0.91), _scores("1", 0.90), margin=0.02, floor=0.80)
    assert promoted is True and "version 1" in reason


def test_equal_macro_f1_is_not_enough() -> None:
    assert decide(_scores("2", 0.90), _scores("1", 0.90), margin=0.02, floor=0.80)[0] is False


def test_a_recall_drop_beyond_the_margin_refuses_even_a_better_model() -> None:
    candidate = _scores("2", 0.95, spine=0.87)
    champion = _scores("1", 0.90, spine=0.90)
    promoted, reason = decide(candidate, champion, margin=0.02, floor=0.80)
    assert promoted is False and "spine -0.0300" in reason


def test_a_recall_drop_within_the_margin_is_allowed() -> None:
    candidate = _scores("2", 0.95, spine=0.88)
    champion = _scores("1", 0.90, spine=0.90)
    assert decide(candidate, champion, margin=0.02, floor=0.80)[0] is True
