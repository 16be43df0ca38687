"""Approval-gated promotion and shadow deployment on a real MLflow registry (SQLite), through the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pytest

from dicom_router import LABELS
from dicom_router.candidates import save_bundle
from dicom_router.config import Settings
from dicom_router.inference import Bundle
from dicom_router.registry import (
    Scores,
    connect,
    decision_document,
    experiment,
    record_request,
    register_bundle,
)
from tests.conftest import run_cli


def _register(settings: Settings, bundle: Path, tmp_path: Path) -> str:
    """The tiny bundle saved and registered as training saves and registers a candidate."""
    connect(settings)
    saved = tmp_path / f"saved-{len(list(tmp_path.glob('saved-*')))}"
    save_bundle(Bundle(bundle), saved)
    with mlflow.start_run(experiment_id=experiment(settings, "approval-test")) as run:
        mlflow.log_artifacts(str(saved), "bundle")
    return str(register_bundle(settings, run.info.run_id, {}).version)


def _request(settings: Settings, version: str, champion: str) -> str:
    """A request as ``promote`` files it after a passed gate (the gate's figures are the test's)."""
    scores = [Scores(v, f1, dict.fromkeys(LABELS, f1)) for v, f1 in ((version, 0.93), (champion, 0.91))]
    decision = decision_document(False, scores[0], scores[1], "the gate passed; awaiting a person's approval")
    return record_request(settings, version, decision | {"passed": True, "reviewer": None})


def _json(*args: str, expect: int = 0) -> Any:
    result = run_cli(*args, "--json")
    assert result.returncode == expect, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_a_person_approves_or_rejects_each_request_and_the_history_says_who_and_why(
    settings: Settings, tiny_bundle: Path, tmp_path: Path
) -> None:
    versions = [_register(settings, tiny_bundle, tmp_path) for _ in range(3)]
    assert versions == ["1", "2", "3"]
    client = connect(settings)
    client.set_registered_model_alias("bodypart-router", "champion", "1")

    first = _request(settings, "2", champion="1")
    second = _request(settings, "3", champion="1")
    assert str(client.get_model_version_by_alias("bodypart-router", "champion").version) == "1"  # asks only
    assert run_cli("promote", "--approve", first).returncode == 64  # who approves must be said

    approved = _json(
        "promote", "--approve", first, "--reviewer", "dr-lee", "--note", "shadow week looked fine"
    )
    assert approved["promoted"] is True and approved["request"] == first
    assert str(client.get_model_version_by_alias("bodypart-router", "champion").version) == "2"
    tags = client.get_model_version("bodypart-router", "2").tags
    assert tags["approval.decision"] == "approved" and tags["approval.reviewer"] == "dr-lee"
    assert tags["approval.request"] == first and "shadow week" in tags["approval.reason"]
    again = run_cli("promote", "--approve", first, "--reviewer", "dr-lee")
    assert again.returncode == 64 and "already approved" in again.stderr

    stale = run_cli("promote", "--approve", second, "--reviewer", "dr-lee")  # filed against version 1
    assert stale.returncode == 64 and "champion changed" in stale.stderr
    rejected = _json("promote", "--reject", second, "--reviewer", "dr-kim", "--note", "stale figures")
    assert rejected["promoted"] is False
    assert client.get_model_version("bodypart-router", "3").tags["approval.decision"] == "rejected"
    assert run_cli("promote", "--approve", "nope", "--reviewer", "x").returncode == 64

    shadow = _json("promote", "--shadow", "3", "--reviewer", "dr-kim")
    assert shadow["action"] == "shadow" and shadow["champion"] == {"version": "2"}
    assert str(client.get_model_version_by_alias("bodypart-router", "challenger").version) == "3"
    assert str(client.get_model_version_by_alias("bodypart-router", "champion").version) == "2"

    history = _json("promote", "--history")
    assert [(h["action"], h["candidate"]["version"]) for h in history] == [
        ("request", "2"),
        ("request", "3"),
        ("approve", "2"),
        ("reject", "3"),
        ("shadow", "3"),
    ]
    assert [h.get("reviewer") for h in history] == [None, None, "dr-lee", "dr-kim", "dr-kim"]
    assert all(h["at"] and h["reason"] for h in history)
    text = run_cli("promote", "--history")
    assert f"approved by dr-lee [request {first}]" in text.stdout


@pytest.mark.parametrize(("policy", "champion_moves"), [("required", False), ("auto", True)])
def test_the_policy_decides_whether_a_passed_gate_moves_the_champion_of_a_live_deployment(
    settings: Settings,
    tiny_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    champion_moves: bool,
) -> None:
    from dicom_router.promotion import needs_approval
    from dicom_router.registry import champion_version

    _register(settings, tiny_bundle, tmp_path)
    monkeypatch.setenv("DICOM_ROUTER_PROMOTION_APPROVAL", policy)
    configured = Settings()
    assert (
        needs_approval(configured, champion_version(configured)) is False
    )  # the first model: no one routes yet
    connect(configured).set_registered_model_alias("bodypart-router", "champion", "1")
    assert needs_approval(configured, champion_version(configured)) is not champion_moves


@pytest.mark.usefixtures("settings")
def test_a_request_carries_the_candidates_shadow_record_and_the_champions_drift_verdict(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_router.monitoring.inference_log import LOG_SCHEMA, InferenceLog
    from dicom_router.promotion import live_evidence, shadow
    from dicom_router.registry import champion_version, model_version

    monkeypatch.setenv("DICOM_ROUTER_INFERENCE_LOG_URI", str(tmp_path / "inference-log"))
    configured = Settings()
    for _ in range(2):
        _register(configured, tiny_bundle, tmp_path)
    client = connect(configured)
    client.set_registered_model_alias("bodypart-router", "champion", "1")
    client.set_model_version_tag("bodypart-router", "1", "drift.alert", "true")
    assert live_evidence(configured, model_version(configured, "models:/bodypart-router/2"), None) == {
        "shadow": None,  # never in shadow: no live record to show
        "drift": None,
    }
    shadow(configured, "2")
    log = InferenceLog(configured.inference_log, configured)
    answers = [("spine", "spine"), ("spine", "others"), ("abdominal", "abdominal"), ("others", "others")]
    for i, (champion, challenger) in enumerate(answers):
        record = dict.fromkeys(LOG_SCHEMA.names) | {
            "at": datetime.now(UTC),
            "model_version": "bodypart-router/1",
            "sop_uid_hash": f"h{i}",
            "site_id": "s1",
            "scanner_id": "x",
            "pred_label": champion,
            "confidence": 0.9,
            "shadow_label": challenger,
            "shadow_confidence": 0.8,
            "shadow_version": "bodypart-router/2",
        }
        log.append(record)
    log.close()
    candidate = model_version(configured, "models:/bodypart-router/2")
    evidence = live_evidence(configured, candidate, champion_version(configured))
    assert evidence["shadow"]["overall"]["n"] == 4 and evidence["shadow"]["overall"]["agreement"] == 0.75
    assert evidence["shadow"]["groups"][0]["by"] == {"site_id": "s1", "scanner_id": "x"}
    assert evidence["drift"] == {"alert": "true"}
