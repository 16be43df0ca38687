"""Routing rules: loading and validation of the YAML file, and which route each instance gets (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_router import LABELS
from dicom_router.routing.rules import (
    EXAMPLE_RULES,
    Decision,
    RoutingRules,
    RulesError,
    Subject,
    decide,
    explain,
)

DESTINATIONS = """
destinations:
  chest: {aet: CHEST, port: 4243}
  spine: {aet: SPINE, port: 4243}
  archive: {aet: ARCHIVE, host: archive.example.org, port: 104}
  station: {aet: REVIEW, port: 4243}
"""


def rules(body: str, *, default: str = "archive", review: str = "destination: station") -> RoutingRules:
    return RoutingRules.from_yaml(f"{DESTINATIONS}\nreview: {{{review}}}\ndefault: {default}\n{body}")


def subject(
    body_part: str | None = "adult_chest",
    confidence: float | None = 0.99,
    *,
    tags: dict[str, str] | None = None,
    calling_aet: str | None = None,
    study_conflict: bool = False,
    error: str | None = None,
    novelty: float | None = None,
    review_threshold: float | None = None,
) -> Subject:
    return Subject(
        body_part, confidence, tags or {}, calling_aet, study_conflict, error, novelty, review_threshold
    )


def load_error(text: str, tmp_path: Path) -> str:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesError) as caught:
        RoutingRules.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    return message


CHEST_THEN_ANY = """
rules:
  - {name: chest-rule, when: {body_part: [adult_chest, pediatric_chest]}, route: chest}
  - {name: catch-all, route: spine}
  - {name: never-reached, when: {body_part: adult_chest}, route: archive}
"""


def test_first_matching_rule_wins() -> None:
    routing = rules(CHEST_THEN_ANY)
    assert decide(routing, subject("pediatric_chest")) == Decision("chest-rule", "chest", "chest")
    assert decide(routing, subject("spine")) == Decision("catch-all", "spine", "spine")


def test_default_applies_when_no_rule_matches() -> None:
    routing = rules("rules:\n  - {name: spine-rule, when: {body_part: spine}, route: spine}")
    assert decide(routing, subject("others")) == Decision("default", "archive", "archive")
    assert decide(rules("", default="review"), subject("others")) == Decision("default", "review", "station")


def test_errors_go_to_review_before_any_rule() -> None:
    routing = rules(CHEST_THEN_ANY)
    failed = subject(None, None, error="Truncated: pixel data is cut short")
    assert decide(routing, failed) == Decision("error", "review", "station")
    assert decide(routing, subject("adult_chest", 0.9, error="NotDicom: no preamble")).rule == "error"


def test_low_confidence_goes_to_review_before_any_rule_but_unrouted_does_not() -> None:
    routing = rules(CHEST_THEN_ANY, review="destination: station, below_confidence: 0.6")
    assert decide(routing, subject("adult_chest", 0.59)) == Decision("low-confidence", "review", "station")
    assert decide(routing, subject("adult_chest", 0.6)).rule == "chest-rule"  # the threshold is exclusive
    assert decide(routing, subject("adult_chest", None)).rule == "low-confidence"
    assert decide(routing, subject("unrouted", None)).rule == "catch-all"


def test_by_default_each_prediction_is_held_to_its_own_models_review_threshold() -> None:
    routing = rules(CHEST_THEN_ANY)  # no below_confidence: the model's own
    assert routing.review.below_confidence == "model"
    assert decide(routing, subject("adult_chest", 0.9, review_threshold=0.85)).rule == "chest-rule"
    assert decide(routing, subject("adult_chest", 0.9, review_threshold=0.95)).rule == "low-confidence"
    assert decide(routing, subject("adult_chest", 0.95, review_threshold=0.95)).rule == "chest-rule"
    assert decide(routing, subject("adult_chest", 0.96)).rule == "low-confidence"  # none: 0.97
    assert decide(routing, subject("adult_chest", 0.97)).rule == "chest-rule"
    assert decide(routing, subject("unrouted", None, review_threshold=0.95)).rule == "catch-all"
    fixed = rules(CHEST_THEN_ANY, review="destination: station, below_confidence: 0.6")
    assert decide(fixed, subject("adult_chest", 0.9, review_threshold=0.95)).rule == "chest-rule"
    assert decide(fixed, subject("adult_chest", 0.59, review_threshold=0.5)).rule == "low-confidence"


def test_a_review_threshold_that_is_neither_a_probability_nor_model_is_refused(tmp_path: Path) -> None:
    for value in ("modle", "1.5", "-0.1"):
        message = load_error(
            f"{DESTINATIONS}\nreview: {{below_confidence: {value}}}\ndefault: archive\n", tmp_path
        )
        assert "below_confidence" in message


def test_an_image_unlike_the_training_images_goes_to_review_however_confident_the_model() -> None:
    routing = rules(CHEST_THEN_ANY, review="destination: station, below_confidence: 0.6")
    assert routing.review.above_novelty == 1.0  # on unless a rules file turns it off
    assert decide(routing, subject("adult_chest", 1.0, novelty=1.3)) == Decision(
        "unfamiliar", "review", "station"
    )
    assert decide(routing, subject("adult_chest", 1.0, novelty=1.0)).rule == "chest-rule"  # 1.0 is familiar
    assert decide(routing, subject("adult_chest", 1.0, novelty=None)).rule == "chest-rule"  # an older bundle
    assert decide(routing, subject("adult_chest", 0.5, novelty=9.0)).rule == "low-confidence"
    assert decide(routing, subject("unrouted", None, novelty=9.0)).rule == "catch-all"
    assert decide(routing, subject("adult_chest", 1.0, novelty=9.0), reviewed=True).rule == "chest-rule"
    off = rules(CHEST_THEN_ANY, review="destination: station, above_novelty: null")
    assert decide(off, subject("adult_chest", 1.0, novelty=9.0)).rule == "chest-rule"
    looser = rules(CHEST_THEN_ANY, review="destination: station, above_novelty: 2.5")
    assert decide(looser, subject("adult_chest", 1.0, novelty=2.0)).rule == "chest-rule"


def test_review_without_destination_keeps_the_instance_in_orthanc() -> None:
    routing = rules("rules:\n  - {name: check-spines, when: {body_part: spine}, route: review}", review="")
    assert decide(routing, subject("spine")) == Decision("check-spines", "review", None)
    assert decide(routing, subject("spine", error="NoPixelData: none")) == Decision("error", "review", None)
    assert decide(routing, subject("spine", 0.1)) == Decision("low-confidence", "review", None)


def test_unrouted_matches_only_unrouted_and_body_part_never_matches_unclassified() -> None:
    routing = rules("rules:\n  - {name: non-radiograph, when: {body_part: unrouted}, route: spine}")
    assert decide(routing, subject("unrouted", None)).rule == "non-radiograph"
    assert decide(routing, subject("others")).rule == "default"
    assert decide(routing, subject(None, None)).rule == "default"


def test_tag_globs_are_case_sensitive_and_missing_tags_never_match() -> None:
    routing = rules(
        """
rules:
  - name: er-chests
    when: {modality: [CR, DX], tags: {StationName: "ER*", SeriesNumber: [1, 2]}}
    route: chest
  - {name: any-station, when: {tags: {StationName: "*"}}, route: spine}
"""
    )
    er = {"Modality": "DX", "StationName": "ER-3", "SeriesNumber": "2"}
    assert decide(routing, subject(tags=er)).rule == "er-chests"
    assert decide(routing, subject(tags={**er, "StationName": "er-3"})).rule == "any-station"
    assert decide(routing, subject(tags={**er, "Modality": "CT"})).rule == "any-station"
    assert decide(routing, subject(tags={"Modality": "DX", "SeriesNumber": "1"})).rule == "default"
    assert routing.tag_keywords() == ["Modality", "SeriesNumber", "StationName"]


def test_calling_aet_globs_select_the_sender() -> None:
    routing = rules("rules:\n  - {name: from-ed, when: {calling_aet: 'ED_*'}, route: chest}")
    assert decide(routing, subject("spine", calling_aet="ED_XRAY1")).rule == "from-ed"
    assert decide(routing, subject("spine", calling_aet="ed_xray1")).rule == "default"
    assert decide(routing, subject("spine", calling_aet=None)).rule == "default"


def test_confidence_bounds_are_min_inclusive_and_max_exclusive() -> None:
    routing = rules(
        "rules:\n  - {name: middling, when: {min_confidence: 0.7, max_confidence: 0.9}, route: review}",
        review="below_confidence: 0.0",
    )
    assert decide(routing, subject(confidence=0.7)).rule == "middling"
    assert decide(routing, subject(confidence=0.9)).rule == "default"
    assert decide(routing, subject("unrouted", None)).rule == "default"


def test_conflicting_study_routes_to_review_first_in_the_example() -> None:
    routing = RoutingRules.load(EXAMPLE_RULES)
    conflicted = subject("adult_chest", 0.97, study_conflict=True)
    assert decide(routing, conflicted) == Decision("conflicting-study", "review", "review-station")
    assert decide(routing, subject("adult_chest", 0.97)).routed_to == "chest-pacs"


def test_example_file_loads_and_routes_every_class() -> None:
    routing = RoutingRules.load(EXAMPLE_RULES)
    assert {name: d.aet for name, d in routing.destinations.items()} == {
        "chest-pacs": "CHESTPACS",
        "msk-pacs": "MSKPACS",
        "abdomen-pacs": "ABDOPACS",
        "archive": "ARCHIVE",
        "review-station": "REVIEW",
    }
    assert {(d.host, d.port) for d in routing.destinations.values()} == {("127.0.0.1", 4243)}
    routed = {label: decide(routing, subject(label, 0.99)).routed_to for label in (*LABELS, "unrouted")}
    assert routed == {
        "abdominal": "abdomen-pacs",
        "adult_chest": "chest-pacs",
        "pediatric_chest": "chest-pacs",
        "spine": "msk-pacs",
        "others": "archive",
        "unrouted": "archive",
    }
    assert decide(routing, subject("spine", 0.94)) == Decision("low-confidence", "review", "review-station")


def test_explain_says_why_earlier_rules_did_not_match() -> None:
    routing = RoutingRules.load(EXAMPLE_RULES)
    spine = subject("spine", 0.99, tags={"Modality": "DX"})
    explained = explain(routing, spine)
    assert [name for name, _, _ in explained] == [rule.name for rule in routing.rules]
    assert explained[0] == ("conflicting-study", False, "the study has no conflict")
    assert explained[1] == ("chest", False, "body_part is 'spine', not 'adult_chest' or 'pediatric_chest'")
    assert explained[2] == ("spine", True, "")
    first_match = next(name for name, matched, _ in explained if matched)
    assert first_match == decide(routing, spine).rule


def test_unknown_destination_is_a_clear_error(tmp_path: Path) -> None:
    message = load_error(
        f"{DESTINATIONS}\ndefault: archive\nrules:\n  - {{name: chest-rule, route: chest-pcas}}\n", tmp_path
    )
    assert "rule 'chest-rule': route 'chest-pcas' is not a declared destination" in message
    assert "declared: chest, spine, archive, station" in message
    message = load_error(f"{DESTINATIONS}\ndefault: archive\nreview: {{destination: nowhere}}\n", tmp_path)
    assert "review.destination 'nowhere' is not a declared destination" in message


def test_duplicate_rule_names_are_refused(tmp_path: Path) -> None:
    body = "rules:\n  - {name: twice, route: chest}\n  - {name: twice, route: spine}\n"
    message = load_error(f"{DESTINATIONS}\ndefault: archive\n{body}", tmp_path)
    assert "rule name 'twice' is used twice" in message


def test_unknown_dicom_keyword_and_unknown_key_are_refused(tmp_path: Path) -> None:
    body = "rules:\n  - {name: typo, when: {tags: {Modalty: CR}, bodypart: spine}, route: chest}\n"
    message = load_error(f"{DESTINATIONS}\ndefault: archive\n{body}", tmp_path)
    assert "rules[0].when.tags (rule 'typo'): 'Modalty' is not a DICOM keyword" in message
    assert "rules[0].when.bodypart (rule 'typo'): unknown key" in message


def test_unknown_body_part_and_bad_ae_title_are_refused(tmp_path: Path) -> None:
    body = "rules:\n  - {name: r, when: {body_part: chest}, route: chest}\n"
    message = load_error(f"{DESTINATIONS}\ndefault: archive\n{body}", tmp_path)
    assert "unknown body part 'chest'" in message
    message = load_error("destinations: {x: {aet: WAY_TOO_LONG_AE_TITLE, port: 104}}\ndefault: x\n", tmp_path)
    assert "destinations.x.aet: 'WAY_TOO_LONG_AE_TITLE' is not a DICOM AE title" in message


def test_missing_default_is_refused(tmp_path: Path) -> None:
    assert load_error(DESTINATIONS, tmp_path).endswith("default: required but missing")


def test_review_is_reserved_and_cannot_name_a_destination(tmp_path: Path) -> None:
    message = load_error("destinations: {review: {aet: REVIEW, port: 104}}\ndefault: review\n", tmp_path)
    assert "'review' is reserved" in message


def test_bad_yaml_and_duplicate_keys_name_the_line(tmp_path: Path) -> None:
    misindented = "destinations:\n  a:\n    aet: A\n   port: 1\ndefault: a\n"
    assert "not valid YAML: line 4, column 4: expected <block end>" in load_error(misindented, tmp_path)
    duplicated = "destinations:\n  a: {aet: A, port: 1}\n  a: {aet: B, port: 2}\ndefault: a\n"
    assert "not valid YAML: line 3, column 3: duplicate key 'a'" in load_error(duplicated, tmp_path)
    assert "found an empty file" in load_error("", tmp_path)
    with pytest.raises(RulesError, match="cannot read the rules file"):
        RoutingRules.load(tmp_path / "none.yaml")
