"""A challenger in shadow: the model server answers with both models, the router routes by the champion
and logs both, and ``compare`` reports agreement and reviewed accuracy per site and scanner."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from dicom_router import stack
from dicom_router.config import Settings
from dicom_router.dicom.deid import load_key, uid_hash
from dicom_router.monitoring.compare import compare, mean_ci
from dicom_router.monitoring.inference_log import read_inference_log
from dicom_router.routing.queue import RoutingQueue
from dicom_router.synth import synthesize
from tests.conftest import phi_values, run_cli, send, untrained_bundle, wait_for_queue, wait_until


@pytest.fixture(scope="module")
def challenger_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another untrained bundle, prepared at another size (so the server prepares the image twice)."""
    return untrained_bundle(tmp_path_factory.mktemp("challenger") / "b", seed=7, image_size=40)


def test_a_bootstrap_interval_holds_the_rate_and_is_none_without_data() -> None:
    interval = mean_ci([1, 1, 0, 1, 0, 1, 1, 1])
    assert interval is not None and interval[0] <= 0.75 <= interval[1] and interval[1] - interval[0] > 0.2
    assert mean_ci([]) is None


def test_compare_counts_agreement_and_reviewed_accuracy_by_site() -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "sop_uid_hash": ["a", "b", "c", "d", "d"],
            "site_id": ["s1", "s1", "s2", "s2", "s2"],
            "scanner_id": ["x", "x", "y", "y", "y"],
            "model_version": ["m/1"] * 5,
            "pred_label": ["spine", "spine", "others", "spine", "abdominal"],
            "confidence": [0.9, 0.8, 0.7, 0.6, 0.6],
            "shadow_label": ["spine", "abdominal", "others", None, "spine"],
            "shadow_confidence": [0.9, 0.5, 0.7, None, 0.5],
            "shadow_version": ["m/2", "m/2", "m/2", None, "m/2"],
        }
    )
    document = compare(frame, {"b": "abdominal", "d": "spine"}, None)
    assert document["overall"]["n"] == 4 and document["overall"]["agreement"] == 0.5  # d counted once
    s1, s2 = document["groups"]
    assert s1["by"] == {"site_id": "s1", "scanner_id": "x"} and s1["reviewed"] == 1
    assert s1["champion_accuracy"] == 0.0 and s1["challenger_accuracy"] == 1.0
    assert s2["champion_accuracy"] == 0.0 and s2["challenger_accuracy"] == 1.0  # d's newest answer
    assert {d["sop_hash"] for d in document["disagreements"]} == {"b", "d"}
    assert document["challenger_versions"] == ["m/2"]


def test_the_router_routes_by_the_champion_and_logs_the_challengers_answer_beside_it(
    routed_stack: Settings, challenger_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.Process("model_server", routed_stack).stop()
    log_prefix = str(tmp_path / "inference-log")
    for key, value in {
        "SHADOW_MODEL_URI": str(challenger_bundle),
        "INFERENCE_LOG_URI": log_prefix,
        "INFERENCE_LOG_FLUSH_S": "1",
    }.items():
        monkeypatch.setenv(f"DICOM_ROUTER_{key}", value)
    settings = Settings()
    stack.model_server_up(settings)
    synthesize(tmp_path / "in", 12, sites=3, seed=31, long_side_px=64)
    stack.router_up(settings)
    send(tmp_path / "in", stack.orthanc_status(settings)["dicom_port"])
    queue = RoutingQueue(settings.routing_queue)
    wait_for_queue(settings, {"done": 12}, "12 instances routed")
    wait_until(lambda: len(read_inference_log(log_prefix, settings)) == 12, 60, "12 log records")
    frame = read_inference_log(log_prefix, settings)
    assert frame["shadow_label"].notna().all() and set(frame["shadow_version"]) == {"bodypart-router/local"}

    pseudonyms = load_key(settings)
    files = {
        str(uid_hash(pseudonyms, pydicom.dcmread(p), "SOPInstanceUID")): p
        for p in (tmp_path / "in").rglob("*.dcm")
    }
    logged = {str(r["sop_uid_hash"]): r for r in frame.to_dict("records")}
    orthanc = stack.orthanc_client(settings)
    for item in queue.finished()[:4]:  # the champion's answer routed it; the challenger's is the bundle's own
        meta = orthanc.metadata("instances", item.instance_id)
        assert meta["BodyPart"] == logged[str(item.sop_hash)]["pred_label"]
        local = run_cli(
            "predict", str(files[str(item.sop_hash)]), "--model", str(challenger_bundle), "--json"
        )
        (answer,) = json.loads(local.stdout)
        assert answer["label"] == logged[str(item.sop_hash)]["shadow_label"]
        assert abs(answer["confidence"] - logged[str(item.sop_hash)]["shadow_confidence"]) < 1e-4

    reviewed = queue.finished()[:3]
    for item in reviewed:
        assert run_cli("review", "label", str(item.sop_hash), "spine", "--reviewer", "r").returncode == 0
    wait_for_queue(settings, {"done": 12}, "the reviewed instances routed again")
    page = tmp_path / "compare.html"
    result = run_cli("compare", "--since", "1d", "--out", str(page), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(result.stdout)
    expected_agreement = float((frame["pred_label"] == frame["shadow_label"]).mean())
    assert document["overall"]["n"] == 12 and document["overall"]["agreement"] == pytest.approx(
        expected_agreement
    )
    assert document["overall"]["reviewed"] == 3
    champion_right = sum(logged[str(i.sop_hash)]["pred_label"] == "spine" for i in reviewed) / 3
    assert document["overall"]["champion_accuracy"] == pytest.approx(champion_right)
    assert sum(g["n"] for g in document["groups"]) == 12 and len(document["groups"]) == 3
    text = page.read_text()
    assert text.count("<img") == min(len(document["disagreements"]), 200)
    assert not [v for v in phi_values(tmp_path / "in") if v in text or v in result.stdout]
