"""The review loop: the worklist, corrections (CLI, REST API, Orthanc metadata) and their forwarding.

The pure rules run on a queue file alone; the end-to-end test drives the real Orthanc with the hook,
the model server, the router and two ``storescp`` receivers (which never de-duplicate).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pydicom
import pytest

from dicom_router import stack
from dicom_router.dicom.deid import load_key, uid_hash
from dicom_router.registry import connect
from dicom_router.routing import review
from dicom_router.routing.queue import RoutingQueue
from dicom_router.routing.rules import RoutingRules, Subject, decide
from dicom_router.synth import synthesize
from tests.conftest import (
    configure,
    phi_values,
    queue_progress,
    received_by,
    run_cli,
    send,
    storescp,
    wait_for_queue,
    wait_until,
)


@pytest.fixture
def queue(tmp_path: Path) -> RoutingQueue:
    return RoutingQueue(tmp_path / "queue.db")


def _routed(queue: RoutingQueue, name: str, **fields: object) -> None:
    queue.enqueue(name)
    defaults: dict[str, object] = {"state": "done", "sop_hash": f"h-{name}", "site_id": "s1"}
    queue.update(name, **(defaults | fields))


def test_the_worklist_holds_review_and_dead_letters_until_someone_labels_them(queue: RoutingQueue) -> None:
    _routed(queue, "low", body_part="spine", confidence=0.4, rule="low-confidence", routed_to="review")
    _routed(queue, "dead", state="dead", last_error="Retry: forward refused", routed_to="pacs")
    _routed(queue, "auto", body_part="spine", confidence=0.99, rule="default", routed_to="pacs")
    _routed(
        queue, "elsewhere", site_id="s2", body_part=None, routing_error="Truncated: cut", routed_to="review"
    )
    queue.enqueue("waiting")
    assert [i.instance_id for i in review.worklist(queue)] == ["low", "dead", "elsewhere"]
    assert [i.instance_id for i in review.worklist(queue, site="s2")] == ["elsewhere"]
    reasons = [review.entry(i)["reason"] for i in review.worklist(queue)]
    assert reasons == ["rule low-confidence", "dead letter: Retry: forward refused", "Truncated: cut"]

    stored = review.correct(queue, "h-low", "abdominal", reviewer="alice", via="cli", note="clearly a KUB")
    assert (
        stored["kind"] == "label" and stored["previous"] == "spine" and stored["previous_confidence"] == 0.4
    )
    assert stored["at"].endswith(":00:00+00:00")  # kept to the hour, as the inference log keeps time
    assert [i.instance_id for i in review.worklist(queue)] == ["dead", "elsewhere"]
    item = queue.get("low")
    assert item is not None and item.state == "pending" and item.reviewed_label == "abdominal"
    with pytest.raises(review.StillRouting):  # routing has it again: a second label waits for it
        review.correct(queue, "low", "spine", reviewer="bob", via="cli")


def test_a_correction_names_what_it_corrects_and_bad_ones_are_refused_with_their_reason(
    queue: RoutingQueue,
) -> None:
    _routed(queue, "auto", body_part="spine", confidence=0.97, routed_to="pacs", model_version="3")
    _routed(queue, "broken", body_part=None, routing_error="Truncated: cut", routed_to="review")
    assert review.correct(queue, "h-auto", "adult_chest", reviewer="r", via="api")["kind"] == "misrouted"
    with pytest.raises(review.UnknownInstance):
        review.correct(queue, "nope", "spine", reviewer="r", via="cli")
    with pytest.raises(review.ReviewError, match="expected one of abdominal"):
        review.correct(queue, "h-broken", "knee", reviewer="r", via="cli")
    with pytest.raises(review.ReviewError, match="no label to accept"):
        review.correct(queue, "h-broken", None, reviewer="r", via="cli")
    with pytest.raises(review.ReviewError, match="reviewer"):
        review.correct(queue, "h-broken", "spine", reviewer=" ", via="cli")
    (only,) = queue.corrections()
    assert only["model_version"] == "3" and only["previous_route"] == "pacs" and only["via"] == "api"


def test_corrections_are_append_only(queue: RoutingQueue) -> None:
    _routed(queue, "a", body_part="spine", confidence=0.5, routed_to="review")
    review.correct(queue, "a", None, reviewer="r", via="cli")
    db = sqlite3.connect(queue.path)
    for statement in ("UPDATE corrections SET label = 'others'", "DELETE FROM corrections"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute(statement)
    assert [c["kind"] for c in queue.corrections()] == ["accept"]


def test_suggestions_are_the_least_sure_auto_routed_instances_spread_over_sites_and_classes(
    queue: RoutingQueue,
) -> None:
    margins = {"a1": 0.05, "a2": 0.10, "a3": 0.20, "b1": 0.30, "b2": 0.40}
    for name, margin in margins.items():
        _routed(
            queue, name, site_id=name[0], body_part="spine", confidence=0.6, margin=margin, routed_to="pacs"
        )
    _routed(queue, "a-abd", site_id="a", body_part="abdominal", confidence=0.9, margin=0.8, routed_to="pacs")
    _routed(queue, "in-review", site_id="a", margin=0.01, routed_to="review", body_part="spine")
    picked = [i.instance_id for i in review.worklist(queue, suggest_n=5)]
    assert picked == ["a1", "b1", "a-abd", "a2", "b2"]  # each group's least sure before any group's second


def test_the_api_answers_each_mistake_with_its_status(queue: RoutingQueue) -> None:
    _routed(queue, "a", body_part="spine", confidence=0.5, routed_to="review")
    assert review.api(queue, "GET", "/review", {"suggest": "0"}, None)[0] == 400
    assert review.api(queue, "GET", "/review", {"suggest": "x"}, None)[0] == 400
    assert review.api(queue, "POST", "/review/a/label", {}, {"reviewer": "r"})[0] == 400
    assert review.api(queue, "POST", "/review/zz/accept", {}, {"reviewer": "r"})[0] == 404
    assert review.api(queue, "DELETE", "/review/a", {}, None)[0] == 404
    status, stored = review.api(queue, "POST", "/review/a/accept", {}, {"reviewer": "r"})
    assert status == 200 and stored["label"] == "spine"
    assert review.api(queue, "POST", "/review/a/accept", {}, {"reviewer": "r"})[0] == 409


def test_a_reviewed_label_skips_review_rules_but_follows_the_others() -> None:
    rules = RoutingRules.model_validate(
        {
            "destinations": {
                "pacs": {"aet": "PACS", "port": 104},
                "spine-pacs": {"aet": "SPINE", "port": 105},
            },
            "review": {"below_confidence": 0.9},
            "rules": [
                {"name": "cr-review", "when": {"modality": "CR"}, "route": "review"},
                {"name": "spine", "when": {"body_part": "spine"}, "route": "spine-pacs"},
            ],
            "default": "pacs",
        }
    )
    cr_spine = Subject(body_part="spine", confidence=0.99, tags={"Modality": "CR"}, error="Truncated: x")
    assert decide(rules, cr_spine).routed_to == "review"
    assert decide(rules, cr_spine, reviewed=True).destination == "spine-pacs"


def _sop_hashes(folder: Path, key: bytes) -> dict[str, str]:
    """SOP hash → SOPInstanceUID of the files sent."""
    found = {}
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found[str(uid_hash(key, ds, "SOPInstanceUID"))] = str(ds.SOPInstanceUID)
    return found


@pytest.mark.usefixtures("routed_stack")
def test_review_labels_from_the_cli_the_api_and_orthanc_reach_their_destination_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pacs_port, spine_port = stack.free_port(), stack.free_port()
    document = {
        "destinations": {
            "pacs": {"aet": "PACS", "host": "127.0.0.1", "port": pacs_port},
            "spine-pacs": {"aet": "SPINE", "host": "127.0.0.1", "port": spine_port},
        },
        "review": {"below_confidence": 0.0},
        "rules": [
            {"name": "cr-review", "when": {"modality": "CR"}, "route": "review"},
            {"name": "spine", "when": {"body_part": "spine"}, "route": "spine-pacs"},
        ],
        "default": "pacs",
    }
    settings = configure(monkeypatch, tmp_path / "rules.yaml", document, route_changes_poll_s="1")
    synthesize(tmp_path / "cr", 4, sites=1, seed=21, site_profile="site-b", long_side_px=64)
    synthesize(tmp_path / "dx", 3, sites=1, seed=22, site_profile="site-a", long_side_px=64)
    hashes = _sop_hashes(tmp_path, load_key(settings))
    receivers = {"pacs": storescp(tmp_path / "pacs", pacs_port, "PACS")}
    receivers["spine-pacs"] = storescp(tmp_path / "spine", spine_port, "SPINE")
    try:
        stack.router_up(settings)
        port = stack.orthanc_status(settings)["dicom_port"]
        send(tmp_path / "cr", port)
        send(tmp_path / "dx", port)
        queue = RoutingQueue(settings.routing_queue)
        wait_for_queue(settings, {"done": 7}, "7 instances routed")

        listed = run_cli("review", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        worklist = json.loads(listed.stdout)
        assert len(worklist) == 4 and {e["reason"] for e in worklist} == {"rule cr-review"}
        assert all(e["sop_hash"] in hashes and e["site_id"] for e in worklist)
        first, second, third, fourth = (e["sop_hash"] for e in worklist)
        auto = next(i for i in queue.finished() if i.routed_to != "review")
        wrong = "abdominal" if auto.body_part == "spine" else "spine"

        labelled = run_cli("review", "label", first, "spine", "--reviewer", "alice", "--note", "lumbar AP")
        assert labelled.returncode == 0, labelled.stderr
        router = str(stack.router_status(settings)["url"])
        assert httpx.get(f"{router}/review").status_code == 401
        bad = {"Authorization": "Bearer not-the-token"}
        assert (
            httpx.post(f"{router}/review/{second}/accept", json={"reviewer": "x"}, headers=bad).status_code
            == 401
        )
        token = {"Authorization": f"Bearer {stack.review_token(settings)}"}
        assert len(httpx.get(f"{router}/review", headers=token).json()) == 3
        answer = httpx.post(
            f"{router}/review/{second}/label", json={"label": "abdominal", "reviewer": "bob"}, headers=token
        )
        assert answer.status_code == 200 and answer.json()["via"] == "api"
        accepted = httpx.post(f"{router}/review/{third}/accept", json={"reviewer": "bob"}, headers=token)
        assert accepted.status_code == 200 and accepted.json()["kind"] == "accept"
        orthanc = stack.orthanc_client(settings)
        fourth_id = next(e["instance_id"] for e in worklist if e["sop_hash"] == fourth)
        orthanc.set_metadata("instances", fourth_id, "BodyPartReviewed", "spine")  # in Orthanc Explorer
        misrouted = run_cli("review", "label", str(auto.sop_hash), wrong, "--reviewer", "carol")
        assert misrouted.returncode == 0, misrouted.stderr
        wait_until(
            lambda: len(queue.corrections()) == 5,
            120,
            "the label set in Orthanc taken",
            progress=lambda: queue_progress(queue),
        )
        wait_for_queue(settings, {"done": 7}, "the corrected instances routed")
        again = run_cli(
            "review", "label", first, "spine", "--reviewer", "dave"
        )  # a second opinion, same label
        assert again.returncode == 0
        wait_for_queue(settings, {"done": 7}, "the second opinion routed")
        missing = run_cli("review", "accept", "no-such-hash")
        assert missing.returncode == 2 and "UnknownInstance" in missing.stderr
    finally:
        stack.Process("router", settings).stop()
        for receiver in receivers.values():
            receiver.terminate()
            receiver.wait()

    at_pacs, at_spine = received_by(tmp_path / "pacs"), received_by(tmp_path / "spine")
    assert set(at_pacs.values()) | set(at_spine.values()) == {1}  # nothing twice
    assert hashes[first] in at_spine and hashes[fourth] in at_spine and hashes[second] in at_pacs
    third_label = next(c["label"] for c in queue.corrections() if c["sop_hash"] == third)
    assert hashes[third] in (at_spine if third_label == "spine" else at_pacs)
    assert (
        hashes[str(auto.sop_hash)] in at_pacs and hashes[str(auto.sop_hash)] in at_spine
    )  # before and after
    assert sum(at_pacs.values()) + sum(at_spine.values()) == 3 + 4 + 1  # DX auto, 4 reviewed, 1 re-sent

    corrections = queue.corrections()
    assert Counter(c["via"] for c in corrections) == {"cli": 3, "api": 2, "orthanc": 1}
    assert Counter(c["kind"] for c in corrections)["misrouted"] == 1
    assert orthanc.metadata("instances", fourth_id)["RoutedTo"] == "spine-pacs"
    first_id = next(e["instance_id"] for e in worklist if e["sop_hash"] == first)
    meta = orthanc.metadata("instances", first_id)
    assert meta["BodyPartReviewed"] == "spine" and meta["RoutedTo"] == "spine-pacs"
    assert json.loads(run_cli("review", "list", "--json").stdout) == []
    suggested = json.loads(run_cli("review", "list", "--suggest", "5", "--json").stdout)
    assert len(suggested) == 2 and all(e["margin"] is not None for e in suggested)  # unreviewed DX

    published = json.dumps([worklist, corrections, suggested])
    assert not [value for value in phi_values(tmp_path) if value in published]

    # the corrections become training data: a labelled folder, de-identified by ingest, in the next run
    exported = json.loads(run_cli("review", "export", str(tmp_path / "reviewed"), "--json").stdout)
    assert exported["exported"] == 5  # the four in review and the misrouted one, each with its newest label
    catalog = tmp_path / "reviewed.parquet"
    reviewed_labels = str(tmp_path / "reviewed" / "labels.csv")
    ingested = run_cli(
        "ingest", str(tmp_path / "reviewed"), "--catalog", str(catalog), "--labels", reviewed_labels
    )
    assert ingested.returncode == 0, ingested.stderr
    frame = pd.read_parquet(catalog)
    assert set(frame["label_source"]) == {"review"} and set(frame["sop_uid_hash"]) == {
        c["sop_hash"] for c in corrections
    }
    assert dict(zip(frame["sop_uid_hash"], frame["label"], strict=True))[first] == "spine"
    assert not [v for v in phi_values(tmp_path / "reviewed") if v in frame.to_csv()]

    synthesize(tmp_path / "train", 40, sites=2, seed=23, long_side_px=64)
    trained = run_cli(
        "train",
        "--data",
        str(tmp_path / "train"),
        "--with-reviewed",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--arch",
        "resnet18",
        "--json",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    (candidate,) = json.loads(trained.stdout)
    run = connect(settings).get_run(candidate["run_id"])
    split = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="split.json")
        ).read_text()
    )
    reviewed_hashes = {str(c["sop_hash"]) for c in corrections}
    assert reviewed_hashes <= set(split["assignment"])  # all five are in the run's data
    in_training = [h for h in reviewed_hashes if split["assignment"][h] == "train"]
    assert int(run.data.params["reviewed_labels"]) == len(in_training)
    by_site = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/reviewed_sites.json")
    assert sum(by_site.values()) == len(in_training) and set(by_site) <= {c["site_id"] for c in corrections}
