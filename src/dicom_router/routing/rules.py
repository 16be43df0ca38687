"""The routing rules file: a validated model and its evaluation, pure (no Orthanc, no network).

A rules file names the destinations (DICOM nodes), says where failed or uncertain classifications go
(review), and lists rules tried in order, first match wins, ending in an explicit default, so every
instance gets exactly one route that can be explained. Everything is checked when the file is loaded:
a typo stops the worker at start instead of misrouting images later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydicom.datadict import tag_for_keyword

from dicom_router import LABELS

REVIEW = "review"
"""The route (and the ``RoutedTo`` value) for instances a person should look at."""
UNROUTED = "unrouted"
"""``BodyPart`` of instances that are not projection radiographs (CT, MR, multi-frame…)."""
BODY_PARTS: tuple[str, ...] = (*LABELS, UNROUTED)
RESERVED_RULE_NAMES: tuple[str, ...] = ("error", "low-confidence", "unfamiliar", "default")
"""``Decision.rule`` values of the built-in steps; a rule with one of these names would blur the audit."""
EXAMPLE_RULES = Path(__file__).with_name("rules.example.yaml")
"""The commented example shipped with the package (the demo's default rules)."""
MODEL_THRESHOLD: Final = "model"
"""``review.below_confidence: model``: each prediction is held to its own model's review threshold."""
FALLBACK_BELOW_CONFIDENCE = 0.97
"""The review threshold for a model that brings none (trained without cross-validation): the highest
of the thresholds that kept auto-routed accuracy at 99% in three deals of collection-grouped
cross-validation of MobileNet-V2, the model ``make train-real`` promoted then (README, "Training")."""

_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # DICOM default repertoire, no backslash or controls
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # safe in Orthanc metadata, URLs and file names


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file and every problem found."""


@dataclass(frozen=True)
class Subject:
    """What rules see about one instance: the classification and a few header values."""

    body_part: str | None
    """A label, ``unrouted``, or None when classification failed."""
    confidence: float | None
    tags: Mapping[str, str] = field(default_factory=dict)
    """DICOM keyword -> value as a string (Modality, SOPClassUID, BodyPartExamined, StationName…)."""
    calling_aet: str | None = None
    """The AE title that sent the instance to Orthanc."""
    study_conflict: bool = False
    """The study's instances were put in different classes."""
    error: str | None = None
    """``<ErrorType>: <reason>`` when the instance could not be classified."""
    novelty: float | None = None
    """How unlike the model's training images it is (``novelty``); None when the model does not say."""
    review_threshold: float | None = None
    """The model's own review threshold (its card's ``review_threshold``); None when it has none."""


@dataclass(frozen=True)
class Decision:
    rule: str
    """The matching rule's name, or ``error``, ``low-confidence``, ``unfamiliar``, ``default``."""
    routed_to: str
    """Orthanc's ``RoutedTo``: the destination name, or ``review``."""
    destination: str | None
    """The destination to forward to; None keeps the instance in Orthanc only."""


def _as_list(value: Any) -> Any:
    """A single value where a list is expected reads as a one-item list (``body_part: spine``)."""
    return [value] if isinstance(value, str | int | float) and not isinstance(value, bool) else value


def _as_text(value: Any) -> Any:
    """YAML reads ``SeriesNumber: 1`` as an int; tag values are compared as strings."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _either(patterns: list[str]) -> str:
    return " or ".join(repr(p) for p in patterns)


def _globs(patterns: list[str], value: str | None) -> bool:
    """Case-sensitive fnmatch; a missing value never matches, not even ``*``."""
    return value is not None and any(fnmatchcase(value, pattern) for pattern in patterns)


class Destination(BaseModel):
    """A DICOM node instances are C-STOREd to; the called AE title tells nodes on one port apart."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    aet: str
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(ge=1, le=65535)

    @field_validator("aet")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not _AE_TITLE.fullmatch(value) or not value.strip():
            raise ValueError(
                f"{value!r} is not a DICOM AE title (1 to 16 printable ASCII characters, no backslash)"
            )
        return value


class Match(BaseModel):
    """The ``when:`` of a rule: every condition given must hold; an empty one matches everything."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    body_part: list[str] | None = Field(default=None, min_length=1)
    """Labels or ``unrouted``; never matches an instance that could not be classified."""
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    """Inclusive."""
    max_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    """Exclusive."""
    modality: list[str] | None = Field(default=None, min_length=1)
    """Globs on the Modality tag (a shortcut for ``tags: {Modality: …}``)."""
    calling_aet: list[str] | None = Field(default=None, min_length=1)
    """Globs on the AE title that sent the instance to Orthanc (case-sensitive)."""
    tags: dict[str, list[str]] = Field(default_factory=dict)
    """DICOM keyword -> glob(s) on the value as a string; a missing tag never matches."""
    study_conflict: bool | None = None
    """The study's instances were put in different classes."""

    @field_validator("body_part", "modality", "calling_aet", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        value = _as_list(value)
        return [_as_text(item) for item in value] if isinstance(value, list) else value

    @field_validator("tags", mode="before")
    @classmethod
    def _tag_globs(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        normalised = {key: _as_list(globs) for key, globs in value.items()}
        return {
            key: [_as_text(item) for item in globs] if isinstance(globs, list) else globs
            for key, globs in normalised.items()
        }

    @field_validator("body_part")
    @classmethod
    def _known_body_parts(cls, value: list[str] | None) -> list[str] | None:
        for part in value or []:
            if part not in BODY_PARTS:
                raise ValueError(f"unknown body part {part!r} (one of: {', '.join(BODY_PARTS)})")
        return value

    @field_validator("tags")
    @classmethod
    def _known_keywords(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for keyword, globs in value.items():
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"{keyword!r} is not a DICOM keyword (e.g. Modality, BodyPartExamined)")
            if not globs:
                raise ValueError(f"tag {keyword} needs at least one glob")
        return value

    @model_validator(mode="after")
    def _confidence_range(self) -> Match:
        low, high = self.min_confidence, self.max_confidence
        if low is not None and high is not None and low >= high:
            raise ValueError(f"min_confidence {low} must be below max_confidence {high}")
        return self

    def why_not(self, subject: Subject) -> list[str]:
        """Every condition that fails for ``subject``; empty when the rule matches."""
        reasons: list[str] = []
        if self.body_part is not None and subject.body_part not in self.body_part:
            got = "not classified" if subject.body_part is None else repr(subject.body_part)
            reasons.append(f"body_part is {got}, not {_either(self.body_part)}")
        confidence, low, high = subject.confidence, self.min_confidence, self.max_confidence
        if (low is not None or high is not None) and confidence is None:
            reasons.append("no confidence (not classified)")
        elif low is not None and confidence is not None and confidence < low:
            reasons.append(f"confidence {confidence:.4f} is below min_confidence {low}")
        elif high is not None and confidence is not None and confidence >= high:
            reasons.append(f"confidence {confidence:.4f} is not below max_confidence {high}")
        checks: list[tuple[str, list[str] | None, str | None]] = [
            ("calling AET", self.calling_aet, subject.calling_aet)
        ]
        if self.modality is not None:
            checks.append(("Modality", self.modality, subject.tags.get("Modality")))
        checks += [(keyword, globs, subject.tags.get(keyword)) for keyword, globs in self.tags.items()]
        for what, globs, value in checks:
            if globs is not None and not _globs(globs, value):
                reasons.append(
                    f"{what} is missing" if value is None else f"{what} {value!r} is not {_either(globs)}"
                )
        if self.study_conflict is not None and subject.study_conflict != self.study_conflict:
            reasons.append(
                "the study has " + ("conflicting classes" if subject.study_conflict else "no conflict")
            )
        return reasons

    def matches(self, subject: Subject) -> bool:
        return not self.why_not(subject)


class Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    when: Match = Field(default_factory=Match)
    route: str
    """A destination name, or ``review``."""

    @field_validator("when", mode="before")
    @classmethod
    def _empty_when(cls, value: Any) -> Any:
        return {} if value is None else value  # a bare `when:` in YAML is null: match everything


class Review(BaseModel):
    """Where instances a person should check go: failed, low-confidence and unfamiliar ones, and rules
    routing there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    destination: str | None = None
    """A destination name; None keeps them in Orthanc only (still marked ``RoutedTo=review``)."""
    below_confidence: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["model"] = MODEL_THRESHOLD
    """Predictions below this go to review before any rule is tried. ``model`` (the default): the
    threshold the model's own collection-grouped cross-validation found to keep auto-routed accuracy at
    99% (its card's ``review_threshold``, which the server answers with every prediction), so a
    promotion moves it with the calibration it belongs to; 0.97 for a model without one. A number
    holds every model to it."""
    above_novelty: float | None = Field(default=1.0, gt=0.0)
    """Images more unlike the training images than this go to review too, however confident the model
    (``novelty``: 1.0 is where the 5% least typical held-out images of the training sources begin);
    null turns the check off. In cross-validation it sent 13–20% of the images of unseen collections
    to review and cut the images misrouted at 0.95 from 5 to 3, 3 to 2 and 4 to 2 (three deals)."""

    @property
    def fixed_threshold(self) -> float | None:
        """The threshold every model is held to; None when each brings its own (``model``)."""
        return None if isinstance(self.below_confidence, str) else self.below_confidence

    def confidence_threshold(self, model_threshold: float | None) -> float:
        """The confidence below which a prediction of a model with this review threshold (None: it
        brings none) goes to review."""
        if self.fixed_threshold is not None:
            return self.fixed_threshold
        return FALLBACK_BELOW_CONFIDENCE if model_threshold is None else model_threshold


class RoutingRules(BaseModel):
    """A whole rules file: destinations, review, ordered rules and the default route."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    destinations: dict[str, Destination]
    review: Review = Field(default_factory=Review)
    rules: list[Rule] = Field(default_factory=list)
    default: str
    """The route when no rule matches: a destination name or ``review`` (required, so it is a choice)."""

    @field_validator("review", "rules", mode="before")
    @classmethod
    def _empty_section(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:  # a bare `review:` or `rules:` in YAML
            return {} if info.field_name == "review" else []
        return value

    @model_validator(mode="after")
    def _references(self) -> RoutingRules:
        problems: list[str] = []
        declared = ", ".join(self.destinations) or "none"
        for name in self.destinations:
            if name == REVIEW:
                problems.append(f"{REVIEW!r} is reserved for the review route and cannot name a destination")
            elif not _NAME.fullmatch(name):
                problems.append(f"destination name {name!r} must be letters, digits, '.', '_' or '-'")

        def check(route: str, where: str, *, review_ok: bool = True) -> None:
            if route not in self.destinations and not (review_ok and route == REVIEW):
                also = f" or {REVIEW!r}" if review_ok else ""
                problems.append(
                    f"{where} {route!r} is not a declared destination{also} (declared: {declared})"
                )

        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                problems.append(f"rule name {rule.name!r} is used twice (names appear in the routing audit)")
            if rule.name in RESERVED_RULE_NAMES:
                problems.append(f"rule name {rule.name!r} is reserved ({', '.join(RESERVED_RULE_NAMES)})")
            seen.add(rule.name)
            check(rule.route, f"rule {rule.name!r}: route")
        check(self.default, "default")
        if self.review.destination is not None:
            check(self.review.destination, "review.destination", review_ok=False)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def load(cls, path: Path) -> RoutingRules:
        """Read and validate a YAML rules file; RulesError names the file and what is wrong."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RulesError(f"{path}: cannot read the rules file: {exc}") from exc
        return cls.from_yaml(text, source=str(path))

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<rules>") -> RoutingRules:
        """Validate rules given as YAML text (``source`` names it in errors)."""
        try:
            _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RulesError(f"{source}: {_yaml_problem(exc)}") from exc
        if not isinstance(data, dict):
            found = "an empty file" if data is None else f"a {type(data).__name__}"
            raise RulesError(
                f"{source}: expected a mapping with destinations, review, rules and default; found {found}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RulesError(f"{source}: {_readable(exc, data)}") from exc

    def tag_keywords(self) -> list[str]:
        """DICOM keywords the rules read, so a caller can fetch exactly those from the header."""
        keywords = {keyword for rule in self.rules for keyword in rule.when.tags}
        keywords |= {"Modality" for rule in self.rules if rule.when.modality is not None}
        return sorted(keywords)


def _refuse_duplicate_keys(node: Any) -> None:
    """YAML silently keeps the last of two equal keys: a second ``chest-pacs:`` would replace the first."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise yaml.MarkedYAMLError(
                        problem=f"duplicate key {key.value!r}", problem_mark=key.start_mark
                    )
                seen.add(key.value)
            _refuse_duplicate_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item)


def _yaml_problem(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"not valid YAML: {where}{problem}"


def _readable(error: ValidationError, data: Mapping[str, Any]) -> str:
    """pydantic's errors as ``rules[2].when.tags (rule 'x'): what is wrong``, joined by ``; ``."""
    lines = []
    for item in error.errors(include_url=False):
        loc = item["loc"]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            rules = data.get("rules")
            rule = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
            if isinstance(rule, dict) and isinstance(rule.get("name"), str):
                where += f" (rule {rule['name']!r})"
        message = {
            "missing": "required but missing",
            "extra_forbidden": "unknown key (a typo?)",
        }.get(item["type"], str(item["msg"]).removeprefix("Value error, "))
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def _review(rules: RoutingRules, rule: str) -> Decision:
    return Decision(rule=rule, routed_to=REVIEW, destination=rules.review.destination)


def _route(rules: RoutingRules, rule: str, route: str) -> Decision:
    return (
        _review(rules, rule) if route == REVIEW else Decision(rule=rule, routed_to=route, destination=route)
    )


def decide(rules: RoutingRules, subject: Subject, *, reviewed: bool = False) -> Decision:
    """Where one instance goes: errors, low confidence and unfamiliar images to review, then the first
    matching rule, or default.

    A label without a confidence counts as low confidence: nothing vouches for it. A model that does not
    compute novelty (bundles before it) passes the novelty check. A ``reviewed``
    subject's label is a person's: rules that send to review are skipped (it has been reviewed), and
    only a default of ``review`` leaves it there.
    """
    if subject.error is not None and not reviewed:
        return _review(rules, "error")
    if (
        not reviewed
        and subject.body_part in LABELS
        and (
            subject.confidence is None
            or subject.confidence < rules.review.confidence_threshold(subject.review_threshold)
        )
    ):
        return _review(rules, "low-confidence")
    novelty, limit = subject.novelty, rules.review.above_novelty
    unfamiliar = novelty is not None and limit is not None and novelty > limit
    if not reviewed and subject.body_part in LABELS and unfamiliar:
        return _review(rules, "unfamiliar")
    for rule in rules.rules:
        if not (reviewed and rule.route == REVIEW) and rule.when.matches(subject):
            return _route(rules, rule.name, rule.route)
    return _route(rules, "default", rules.default)


def explain(rules: RoutingRules, subject: Subject) -> list[tuple[str, bool, str]]:
    """Per rule in order: (name, matched, why not), with the same conditions ``decide`` uses.

    Only the rules' ``when`` is evaluated; whether error, low confidence or novelty sent it to review
    before any rule is ``decide(...).rule``.
    """
    explained = []
    for rule in rules.rules:
        reasons = rule.when.why_not(subject)
        explained.append((rule.name, not reasons, "; ".join(reasons)))
    return explained
