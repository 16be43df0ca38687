"""Orthanc → hook → queue → model server → rules → metadata → destination, with real servers.

One real Orthanc with the plugin, a second plain Orthanc as the destination (the rules' destinations
are called AETs of it, so its ``CalledAET`` metadata says which route an instance took), the real
KServe model server and the routing worker as separate processes, C-STORE with dcmtk.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import CTImageStorage, generate_uid

from dicom_router import stack
from dicom_router.config import Settings
from dicom_router.dicom.errors import DicomInputError
from dicom_router.inference import Bundle
from dicom_router.orthanc.config import USER_METADATA
from dicom_router.orthanc.send import SendError
from dicom_router.routing.queue import RoutingQueue
from dicom_router.routing.rules import RoutingRules, Subject, decide
from dicom_router.routing.worker import Router
from dicom_router.serving.client import ModelClient
from dicom_router.synth import synthesize
from tests.conftest import (
    configure,
    familiar_bundle,
    queue_progress,
    received_by,
    rules_for,
    run_cli,
    send,
    storescp,
    unfamiliar_dicom,
    untrained_bundle,
    wait_for_queue,
    wait_until,
)
from tests.dicom_factory import dicom_dataset


def write(folder: Path, name: str, ds: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)  # type: ignore[attr-defined]


def odd_instances(folder: Path) -> None:
    """A CT slice, a multi-frame DX (both unrouted) and a DX whose pixel data is cut short (poison)."""
    ct = dicom_dataset(np.zeros((16, 16), np.uint16), Modality="CT")
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    write(folder, "ct.dcm", ct)
    write(folder, "multiframe.dcm", dicom_dataset(np.zeros((3, 16, 16), np.uint16)))
    poison = dicom_dataset(np.zeros((64, 64), np.uint16), raw_pixel_bytes=b"\0" * 100)
    poison.SOPInstanceUID = poison.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    write(folder, "poison.dcm", poison)


def test_every_instance_is_routed_exactly_once_through_outages(
    routed_stack: Settings, tmp_path: Path
) -> None:
    settings = routed_stack
    port = stack.orthanc_status(settings)["dicom_port"]
    batches = [tmp_path / f"batch{i}" for i in range(3)]
    synthesize(batches[0], 8, sites=3, seed=1, long_side_px=64)
    synthesize(batches[1], 8, sites=3, seed=2, long_side_px=64)
    odd_instances(batches[2])
    synthesize(batches[2], 4, sites=2, seed=3, long_side_px=64)
    queue = RoutingQueue(settings.routing_queue)

    stack.router_up(settings)
    send(batches[0], port)
    stack.Process("model_server", settings).stop()  # the model server goes down mid-stream
    send(batches[1], port)
    wait_until(
        lambda: _waiting(queue, _ids(settings)),
        120,
        "instances waiting for the model server",
        progress=lambda: queue_progress(queue),
    )
    stack.model_server_up(settings)
    stack.Process("router", settings).stop()  # and the worker restarts while instances arrive
    send(batches[2], port)
    stack.router_up(settings)

    orthanc = stack.orthanc_client(settings)
    total = 8 + 8 + 4 + 3
    wait_until(
        lambda: len(orthanc.instances()) == total,
        60,
        "all instances stored",
        progress=lambda: len(orthanc.instances()),
    )
    wait_for_queue(settings, {"done": total}, "all routed")

    rules = RoutingRules.load(settings.route_rules)  # type: ignore[arg-type]
    destination = stack.orthanc_client(settings, "destination")
    called: Counter[str] = Counter()
    for instance in destination.instances():
        called[destination.metadata("instances", instance)["CalledAET"]] += 1
    expected: Counter[str] = Counter()
    history = queue.history()
    for instance in orthanc.instances():
        meta = orthanc.metadata("instances", instance)
        assert set(meta) & set(USER_METADATA) >= {"RoutedTo"}
        tags = dict(orthanc.simplified_tags(instance))
        subject = Subject(
            body_part=meta.get("BodyPart"),
            confidence=float(meta["BodyPartConfidence"]) if "BodyPartConfidence" in meta else None,
            tags={k: str(v) for k, v in tags.items() if isinstance(v, str)},
            calling_aet=meta["RemoteAET"],
            error=meta.get("RoutingError"),
        )
        decision = decide(rules, subject)
        assert meta["RoutedTo"] == decision.routed_to
        expected[rules.destinations[decision.destination].aet] += 1  # type: ignore[index]
        if meta.get("BodyPart") not in (None, "unrouted"):
            assert meta["ModelVersion"] == "bodypart-router/local"
            assert 0.0 < float(meta["BodyPartConfidence"]) <= 1.0
        delivered = [h for h in history if h["instance_id"] == instance and h["outcome"] == "delivered"]
        assert len(delivered) == 1, f"{instance} delivered {len(delivered)} times"
    assert called == expected
    assert expected["ARCHIVE"] == 2 and expected["REVIEW"] == 1  # CT + multi-frame; the poison
    poison = [i for i in orthanc.instances() if "RoutingError" in orthanc.metadata("instances", i)]
    assert len(poison) == 1
    assert orthanc.metadata("instances", poison[0])["RoutingError"].split(":")[0] in (
        "InvalidPixelData",
        "Truncated",
    )

    synthesize(tmp_path / "intruder", 2, sites=1, seed=9, long_side_px=64)
    with pytest.raises(SendError):  # an AET Orthanc was not told about cannot store
        send(tmp_path / "intruder", port, calling_aet="INTRUDER")
    assert len(orthanc.instances()) == total

    result = run_cli("route", "--history", "--json")
    assert result.returncode == 0
    assert sum(1 for h in json.loads(result.stdout) if h["outcome"] == "delivered") == total


def _waiting(queue: RoutingQueue, ids: list[str]) -> bool:
    """Instances put back because the model server is down, without spending their attempts."""
    items = [queue.get(i) for i in ids]
    return any(
        item is not None and "ModelUnavailable" in (item.last_error or "") and item.attempts == 0
        for item in items
    )


def _ids(settings: Settings) -> list[str]:
    return stack.orthanc_client(settings).instances()


def test_instances_the_queue_never_saw_are_found_in_orthancs_change_log(
    routed_stack: Settings, tmp_path: Path
) -> None:
    settings = routed_stack
    synthesize(tmp_path / "in", 5, sites=2, seed=4, long_side_px=64)
    send(tmp_path / "in", stack.orthanc_status(settings)["dicom_port"])
    (settings.routing_queue).unlink()  # the queue is lost (hook and worker state gone)
    for suffix in ("-wal", "-shm"):
        (settings.routing_dir / f"queue.db{suffix}").unlink(missing_ok=True)
    stack.Process("orthanc", settings).stop()  # Orthanc restarts too; its /changes log survives
    stack.orthanc_up(settings)
    result = run_cli("route", "--once")
    assert result.returncode == 0, result.stderr
    queue = RoutingQueue(settings.routing_queue)
    assert queue.counts() == {"done": 5}
    orthanc = stack.orthanc_client(settings)
    assert all("RoutedTo" in orthanc.metadata("instances", i) for i in orthanc.instances())


def test_orthanc_hands_the_router_each_instance_file_as_stored_without_gzip(
    settings: Settings, tmp_path: Path
) -> None:
    stack.orthanc_up(settings)
    try:
        synthesize(tmp_path / "in", 1, seed=6, long_side_px=64)
        send(tmp_path / "in", stack.orthanc_status(settings)["dicom_port"])
        orthanc = stack.orthanc_client(settings)
        (instance_id,) = orthanc.instances()
        response = orthanc.http.get(
            f"{orthanc.url}/instances/{instance_id}/file", headers={"Accept-Encoding": "gzip"}
        )
        assert response.status_code == 200
        assert "content-encoding" not in response.headers  # gzip on loopback only burns CPU
        sent = pydicom.dcmread(next((tmp_path / "in").rglob("*.dcm")))
        assert pydicom.dcmread(BytesIO(response.content)).SOPInstanceUID == sent.SOPInstanceUID
    finally:
        stack.down(settings)


@pytest.mark.usefixtures("settings")
def test_dry_run_shows_the_rule_each_file_would_hit(tiny_bundle: Path, tmp_path: Path) -> None:
    synthesize(tmp_path / "in", 4, sites=2, seed=5, long_side_px=64)
    odd_instances(tmp_path / "in")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rules_for(4243)))
    result = run_cli(
        "route",
        "--dry-run",
        str(tmp_path / "in"),
        "--rules",
        str(rules),
        "--model",
        str(tiny_bundle),
        "--json",
    )
    assert result.returncode == 2, result.stderr  # the poison file is reported, the rest still decided
    records = {Path(r["file"]).name: r for r in json.loads(result.stdout)}
    assert records["ct.dcm"]["rule"] == "non-radiograph" and records["ct.dcm"]["routed_to"] == "archive"
    assert records["multiframe.dcm"]["body_part"] == "unrouted"
    assert records["poison.dcm"]["routed_to"] == "review" and records["poison.dcm"]["rule"] == "error"
    radiographs = [r for name, r in records.items() if name not in ("ct.dcm", "multiframe.dcm", "poison.dcm")]
    assert len(radiographs) == 4
    for r in radiographs:
        assert r["rule"] in ("cr", "default") and r["model"] == "bodypart-router/local"
        assert r["rules"][0] == {
            "rule": "non-radiograph",
            "matched": False,
            "why_not": r["rules"][0]["why_not"],
        }
    bad = run_cli("route", "--dry-run", str(tmp_path / "in"), "--rules", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 64


@pytest.mark.usefixtures("settings")
def test_dry_run_sends_a_view_unlike_the_training_images_to_review(tmp_path: Path) -> None:
    synthesize(tmp_path / "seen", 30, sites=2, seed=11, long_side_px=64)
    bundle = familiar_bundle(tmp_path / "bundle", tmp_path / "seen")
    (tmp_path / "seen" / "checkerboard.dcm").write_bytes(unfamiliar_dicom())
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rules_for(4243)))  # review.above_novelty: the default, 1.0
    result = run_cli(
        "route", "--dry-run", str(tmp_path / "seen"), "--rules", str(rules), "--model", str(bundle), "--json"
    )
    assert result.returncode == 0, result.stderr
    records = {Path(r["file"]).name: r for r in json.loads(result.stdout)}
    odd = records.pop("checkerboard.dcm")
    assert odd["novelty"] > 5.0 and odd["rule"] == "unfamiliar" and odd["routed_to"] == "review"
    for r in records.values():  # the rest by their novelty: 95% of the images it was fitted on pass
        assert (r["rule"] == "unfamiliar") == (r["novelty"] > 1.0) and r["rule"] in (
            "unfamiliar",
            "cr",
            "default",
        )
    assert sum(r["routed_to"] != "review" for r in records.values()) >= 28


def test_a_decoder_killing_instance_and_an_undeliverable_one_end_in_review_and_nothing_stalls(
    routed_stack: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    stack.Process("model_server", routed_stack).stop()
    poison = request.getfixturevalue("killing_decoder")  # the restarted model server's decoders die on it
    stack.model_server_up(routed_stack)
    offline_port = stack.free_port()  # nothing listens there (yet)
    document: dict[str, Any] = rules_for(stack.orthanc_status(routed_stack, "destination")["dicom_port"])
    document["destinations"]["late-pacs"] = {"aet": "LATE", "host": "127.0.0.1", "port": offline_port}
    synthesize(tmp_path / "late", 1, sites=1, seed=12, long_side_px=64)
    (late_file,) = (tmp_path / "late").rglob("*.dcm")
    late_uid = str(pydicom.dcmread(late_file).SOPInstanceUID)
    when = {"tags": {"SOPInstanceUID": [late_uid]}}
    document["rules"].insert(0, {"name": "late", "when": when, "route": "late-pacs"})
    settings = configure(monkeypatch, tmp_path / "rules.yaml", document, route_max_attempts="3")
    orthanc = stack.orthanc_client(settings)
    synthesize(tmp_path / "good", 50, sites=3, seed=11, long_side_px=64)
    (tmp_path / "poison").mkdir()
    (tmp_path / "poison" / "poison.dcm").write_bytes(poison)
    port = stack.orthanc_status(settings)["dicom_port"]
    stack.router_up(settings)
    for folder in ("good", "poison", "late"):
        send(tmp_path / folder, port)
    queue = RoutingQueue(settings.routing_queue)
    wait_for_queue(settings, {"done": 51, "dead": 1}, "51 routed and 1 dead letter")

    by_error = {i: orthanc.metadata("instances", i).get("RoutingError", "") for i in orthanc.instances()}
    (killer,) = [i for i, e in by_error.items() if e.startswith("InvalidPixelData")]
    assert "decoder process died" in by_error[killer]
    assert orthanc.metadata("instances", killer)["RoutedTo"] == "review"
    (late,) = [i for i, e in by_error.items() if e.startswith("DeadLetter")]
    assert orthanc.metadata("instances", late)["RoutedTo"] == "review"
    delivered = [h["instance_id"] for h in queue.history() if h["outcome"] == "delivered"]
    assert len(delivered) == 51 and late not in delivered
    router_url = stack.router_status(settings)["url"]
    assert httpx.get(f"{router_url}/health").json()["ok"] is True
    metrics = httpx.get(f"{router_url}/metrics").text
    assert "dicom_router_dead_letters 1.0" in metrics
    forwarded = [line for line in metrics.splitlines() if line.startswith("dicom_router_forwarded{")]
    assert sum(float(line.split()[-1]) for line in forwarded) == 51

    listed = run_cli("route", "--dead-letter", "--json")
    assert listed.returncode == 0, listed.stderr
    (letter,) = json.loads(listed.stdout)
    assert letter["instance_id"] == late and letter["attempts"] == 3 and len(letter["sop_hash"]) >= 16
    receiver = tmp_path / "received"
    late_destination = storescp(receiver, offline_port, "LATE")
    try:
        replayed = run_cli("route", "--replay", letter["sop_hash"], "--json")
        assert replayed.returncode == 0 and json.loads(replayed.stdout) == {"replayed": [late]}
        wait_for_queue(settings, {"done": 52}, "the replayed letter delivered")
        assert len(list(receiver.iterdir())) == 1
    finally:
        late_destination.terminate()
        late_destination.wait()


def test_the_router_sends_a_view_unlike_the_training_images_to_review_and_orthanc_says_why(
    routed_stack: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.Process("model_server", routed_stack).stop()
    synthesize(tmp_path / "seen", 12, sites=2, seed=11, long_side_px=64)
    monkeypatch.setenv("DICOM_ROUTER_MODEL_URI", str(familiar_bundle(tmp_path / "b", tmp_path / "seen")))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "checkerboard.dcm").write_bytes(unfamiliar_dicom())
    settings = Settings()
    server = stack.model_server_up(settings)
    stack.router_up(settings)
    port = stack.orthanc_status(settings)["dicom_port"]
    for folder in ("seen", "odd"):
        send(tmp_path / folder, port)
    queue = RoutingQueue(settings.routing_queue)
    wait_for_queue(settings, {"done": 13}, "13 instances routed")

    orthanc = stack.orthanc_client(settings)
    novelty = {i: float(orthanc.metadata("instances", i)["BodyPartNovelty"]) for i in orthanc.instances()}
    (odd,) = [i for i, n in novelty.items() if n > 5.0]
    for instance, value in novelty.items():
        item = queue.get(instance)
        assert item is not None and item.novelty == pytest.approx(value, abs=1e-4)
        routed_to = orthanc.metadata("instances", instance)["RoutedTo"]
        assert (item.rule == "unfamiliar") == (value > 1.0) == (routed_to == "review")
    assert queue.get(odd).rule == "unfamiliar"  # type: ignore[union-attr]
    listed = run_cli("review", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    reasons = {e["instance_id"]: e["reason"] for e in json.loads(listed.stdout)}
    assert reasons[odd].startswith("rule unfamiliar (novelty ")
    v1 = httpx.post(
        f"{server}/v1/models/bodypart-router:predict",
        json={"instances": [{"b64": base64.b64encode(unfamiliar_dicom()).decode()}]},
        timeout=30,
    )
    assert v1.json()["predictions"][0]["novelty"] == pytest.approx(novelty[odd], rel=1e-3)


def test_by_default_the_router_holds_each_prediction_to_its_models_own_review_threshold(
    routed_stack: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.Process("model_server", routed_stack).stop()
    synthesize(tmp_path / "in", 12, sites=2, seed=11, long_side_px=64)
    files = sorted((tmp_path / "in").rglob("*.dcm"))
    bundle = untrained_bundle(tmp_path / "bundle")
    results, _ = Bundle(bundle).predict_items([(str(p), p.read_bytes()) for p in files], max_pixels=10**8)
    confidences = sorted(r.confidence for r in results if not isinstance(r, DicomInputError))
    # as if cross-validation had chosen it: in the widest gap between the middle confidences, so the
    # server's answers (the same ONNX graph) fall on the same sides
    split = max(range(3, 8), key=lambda i: confidences[i + 1] - confidences[i])
    threshold = (confidences[split] + confidences[split + 1]) / 2
    card = json.loads((bundle / "card.json").read_text())
    (bundle / "card.json").write_text(json.dumps({**card, "review_threshold": threshold}))
    document = rules_for(stack.orthanc_status(routed_stack, "destination")["dicom_port"])
    document["review"] = {"destination": "review-station"}  # below_confidence: the default, the model's
    settings = configure(monkeypatch, tmp_path / "rules.yaml", document, model_uri=str(bundle))
    server = stack.model_server_up(settings)
    stack.router_up(settings)
    send(tmp_path / "in", stack.orthanc_status(settings)["dicom_port"])
    queue = RoutingQueue(settings.routing_queue)
    wait_for_queue(settings, {"done": 12}, "12 instances routed")

    orthanc = stack.orthanc_client(settings)
    items = [queue.get(i) for i in orthanc.instances()]
    rules_hit: Counter[str] = Counter()
    for item in items:
        assert item is not None and item.confidence is not None
        assert item.review_threshold == pytest.approx(threshold)  # the server answered the card's
        held = item.confidence < threshold
        assert (item.rule == "low-confidence") == held == (item.routed_to == "review")
        rules_hit[str(item.rule)] += 1
    assert 0 < rules_hit["low-confidence"] < 12  # some below the model's threshold, some above
    dry = run_cli("route", "--dry-run", str(tmp_path / "in"), "--model", str(bundle), "--json")
    assert dry.returncode == 0, dry.stderr
    records = json.loads(dry.stdout)
    assert Counter(r["rule"] for r in records) == rules_hit  # the dry run decides as the router did
    assert all(r["review_threshold"] == pytest.approx(threshold) for r in records)
    plain = run_cli("route", "--dry-run", str(tmp_path / "in"), "--model", str(bundle))
    assert (
        plain.stdout.count(f"rule low-confidence (below {threshold:.3f}) → review")
        == rules_hit["low-confidence"]
    )
    v1 = httpx.post(
        f"{server}/v1/models/bodypart-router:predict",
        json={"instances": [{"b64": base64.b64encode(files[0].read_bytes()).decode()}]},
        timeout=30,
    )
    assert v1.json()["predictions"][0]["review_threshold"] == pytest.approx(threshold)


def _counting_destination(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str
) -> tuple[Settings, subprocess.Popen[bytes]]:
    """Rules sending everything to ``pacs``, a ``storescp`` receiving into ``tmp_path/received``."""
    port = stack.free_port()
    document = {
        "destinations": {"pacs": {"aet": "COUNTING", "host": "127.0.0.1", "port": port}},
        "review": {"below_confidence": 0.0},
        "default": "pacs",
    }
    settings = configure(monkeypatch, tmp_path / "rules.yaml", document, **env)
    return settings, storescp(tmp_path / "received", port, "COUNTING")


@pytest.mark.usefixtures("routed_stack")
def test_two_routers_a_kill_and_a_model_server_restart_deliver_each_instance_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, receiver = _counting_destination(monkeypatch, tmp_path, route_lease_s="5")
    batches = [tmp_path / f"batch{i}" for i in range(4)]
    for i, batch in enumerate(batches):
        synthesize(batch, 50, sites=3, seed=30 + i, long_side_px=64)
    orthanc_port = stack.orthanc_status(settings)["dicom_port"]
    try:
        stack.router_up(settings)
        stack.router_up(settings, name="router-b")  # a second consumer of the same queue
        send(batches[0], orthanc_port)
        send(batches[1], orthanc_port)
        os.killpg(stack.Process("router-b", settings).pid() or 0, signal.SIGKILL)  # mid-stream, no cleanup
        stack.Process("model_server", settings).stop()
        send(batches[2], orthanc_port)
        stack.model_server_up(settings)
        stack.router_up(settings, name="router-b")
        send(batches[3], orthanc_port)
        wait_for_queue(settings, {"done": 200}, "200 delivered")
    finally:
        stack.Process("router-b", settings).stop()
        receiver.terminate()
        receiver.wait()
    received = received_by(tmp_path / "received")
    sent = {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for batch in batches
        for path in batch.rglob("*.dcm")
    }
    assert set(received) == sent and len(sent) == 200
    assert [uid for uid, n in received.items() if n > 1] == []


@pytest.mark.usefixtures("routed_stack")
def test_a_lost_store_answer_is_confirmed_from_orthancs_jobs_and_a_deleted_instance_ends_as_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, receiver = _counting_destination(monkeypatch, tmp_path)
    synthesize(tmp_path / "in", 3, sites=1, seed=51, long_side_px=64)
    send(tmp_path / "in", stack.orthanc_status(settings)["dicom_port"])
    orthanc = stack.orthanc_client(settings)
    queue = RoutingQueue(settings.routing_queue)
    wait_for_queue(settings, {"pending": 3}, "the instances queued")
    rules = RoutingRules.load(settings.route_rules)  # type: ignore[arg-type]
    router = Router(settings, rules, orthanc, ModelClient(stack.model_server_url(settings)), queue)
    router.ensure_destinations()
    sent_before_crash, never_sent, deleted = sorted(orthanc.instances())
    orthanc.store("pacs", sent_before_crash)  # a router's store that went through; then it died
    for instance in (sent_before_crash, never_sent, deleted):  # all mid-forward when their router died
        queue.update(
            instance,
            state="forwarding",
            destination="pacs",
            routed_to="pacs",
            body_part="spine",
            confidence=0.9,
            forward_started=time.time() - 5,
        )
    orthanc.http.delete(f"{orthanc.url}/instances/{deleted}").raise_for_status()  # by a user, meanwhile
    try:
        while queue.counts() != {"done": 3}:
            router.step()
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        receiver.terminate()
        receiver.wait()
    received = received_by(tmp_path / "received")
    assert sorted(received.values()) == [1, 1]  # each exactly once
    details = {h["instance_id"]: h["detail"] for h in queue.history() if h["outcome"] == "delivered"}
    assert "confirmed from Orthanc's job history" in details[sent_before_crash]
    assert details[never_sent] == "pacs" and deleted not in details
    assert [h["instance_id"] for h in queue.history() if h["outcome"] == "gone"] == [deleted]
