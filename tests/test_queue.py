"""The routing queue and audit, without Orthanc: idempotent enqueue, due order, backoff, study labels."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from dicom_router.routing.eligibility import projection_radiograph
from dicom_router.routing.health import health
from dicom_router.routing.queue import RoutingQueue


@pytest.fixture
def queue(tmp_path: Path) -> RoutingQueue:
    return RoutingQueue(tmp_path / "routing" / "queue.db")


def test_enqueueing_the_same_instance_twice_keeps_one_row(queue: RoutingQueue) -> None:
    assert queue.enqueue("a") is True
    assert queue.enqueue("a") is False
    assert queue.counts() == {"pending": 1}


def test_due_items_come_oldest_first_and_backoff_doubles_up_to_the_cap(queue: RoutingQueue) -> None:
    for name in ("first", "second"):
        queue.enqueue(name)
        time.sleep(0.01)

    def due(now: float | None = None) -> list[str]:
        claimed = [i.instance_id for i in queue.claim("w", 10, lease_s=60, now=now)]
        queue.release("w", claimed)
        return claimed

    assert due() == ["first", "second"]
    delays = [queue.retry_later("first", "down", base_s=1.0, cap_s=5.0) for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert due() == ["second"]
    item = queue.get("first")
    assert item is not None and item.attempts == 5 and item.last_error == "down"
    assert due(now=time.time() + 6) == ["first", "second"]


def test_a_second_process_sees_what_the_first_wrote(queue: RoutingQueue) -> None:
    queue.enqueue("x")
    other = RoutingQueue(queue.path)  # e.g. Orthanc's hook and the worker
    assert other.get("x") is not None
    other.update("x", state="done", body_part="spine")
    assert queue.counts() == {"done": 1}


def test_study_labels_ignore_unrouted_and_unclassified_instances(queue: RoutingQueue) -> None:
    for instance, label in (("a", "spine"), ("b", "abdominal"), ("c", "unrouted"), ("d", None)):
        queue.enqueue(instance)
        queue.update(instance, study_id="s1", body_part=label)
    queue.enqueue("e")
    queue.update("e", study_id="s2", body_part="spine")
    assert queue.study_labels("s1") == {"spine", "abdominal"}
    assert queue.study_labels("s2") == {"spine"}


def test_the_audit_is_append_only_and_filtered_by_time(queue: RoutingQueue) -> None:
    queue.enqueue("a")
    item = queue.get("a")
    assert item is not None
    queue.audit(item, "decided")
    cut = time.time()
    time.sleep(0.01)
    queue.audit(item, "delivered", "job 1")
    assert [h["outcome"] for h in queue.history()] == ["decided", "delivered"]
    assert [h["outcome"] for h in queue.history(since=cut)] == ["delivered"]
    with pytest.raises(ValueError, match="unknown queue columns"):
        queue.update("a", no_such_column=1)


@pytest.mark.parametrize(
    ("tags", "eligible"),
    [
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1", "Modality": "CR"}, True),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1", "Modality": "DX"}, True),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "Modality": "DX"}, True),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "Modality": "OT"}, False),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "Modality": "CT"}, False),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1", "Modality": "DX", "NumberOfFrames": "3"}, False),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.11", "Modality": "SR"}, False),
    ],
)
def test_only_single_frame_projection_radiographs_go_to_the_model(
    tags: dict[str, str], eligible: bool
) -> None:
    assert projection_radiograph(tags)[0] is eligible


def test_two_workers_never_claim_the_same_row(queue: RoutingQueue) -> None:
    for i in range(10):
        queue.enqueue(f"i{i}")
    other = RoutingQueue(queue.path)  # a second router process (or ``route --once``) on the same file
    first = queue.claim("a", limit=6, lease_s=60)
    second = other.claim("b", limit=6, lease_s=60)
    assert len(first) == 6 and len(second) == 4
    assert not {i.instance_id for i in first} & {i.instance_id for i in second}
    assert other.claim("b", limit=6, lease_s=60) == []  # everything is leased
    queue.release("a", [i.instance_id for i in first])
    assert {i.instance_id for i in other.claim("b", limit=10, lease_s=60)} == {i.instance_id for i in first}


def test_a_killed_workers_rows_come_back_when_its_lease_expires_and_it_cannot_forward_them(
    queue: RoutingQueue,
) -> None:
    queue.enqueue("x")
    assert [i.instance_id for i in queue.claim("dead-worker", limit=5, lease_s=60)] == ["x"]
    other = RoutingQueue(queue.path)
    assert other.claim("b", limit=5, lease_s=60) == []
    later = time.time() + 61
    assert [i.instance_id for i in other.claim("b", limit=5, lease_s=60, now=later)] == ["x"]
    assert queue.hold("dead-worker", ["x"], lease_s=60) == []  # the old owner may no longer send it
    assert other.hold("b", ["x"], lease_s=60) == ["x"]


def test_an_instance_that_keeps_failing_becomes_a_dead_letter_that_can_be_replayed(
    queue: RoutingQueue,
) -> None:
    for name in ("bad", "good"):
        queue.enqueue(name)
    queue.update("bad", sop_hash="0123abcd", body_part="spine", destination="pacs", state="forwarding")
    delays = [queue.retry_later("bad", "job failed", base_s=1.0, cap_s=5.0, max_attempts=3) for _ in range(3)]
    assert delays == [1.0, 2.0, None]
    (letter,) = queue.dead_letters()
    assert letter.instance_id == "bad" and letter.attempts == 3 and letter.last_error == "job failed"
    assert queue.counts() == {"dead": 1, "pending": 1}
    assert queue.replay("unknown") == []
    assert queue.replay("0123abcd") == ["bad"]
    item = queue.get("bad")
    assert item is not None and item.state == "pending" and item.attempts == 0
    assert item.body_part == "spine"  # the classification made is kept: no second model call
    queue.retry_later("bad", "again", base_s=1.0, cap_s=5.0, max_attempts=1)
    assert queue.replay(None) == ["bad"] and queue.dead_letters() == []


def test_a_queue_file_from_an_older_release_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE queue (instance_id TEXT PRIMARY KEY, enqueued_at REAL NOT NULL, "
        "state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, "
        "next_attempt_at REAL NOT NULL DEFAULT 0, last_error TEXT, study_id TEXT, body_part TEXT, "
        "confidence REAL, model_version TEXT, routing_error TEXT, rule TEXT, routed_to TEXT, "
        "destination TEXT, job_id TEXT, done_at REAL)"
    )
    old.execute("INSERT INTO queue (instance_id, enqueued_at) VALUES ('old', 1.0)")
    old.commit()
    old.close()
    queue = RoutingQueue(path)
    assert [i.instance_id for i in queue.claim("w", limit=5, lease_s=60)] == ["old"]


def test_health_fails_only_when_routing_stops_moving(queue: RoutingQueue) -> None:
    now = time.time()
    queue.enqueue("waiting")
    queue.update("waiting", next_attempt_at=now + 60)  # backing off (model server down): not stuck
    stats = queue.stats(now=now)
    assert health(stats, last_pass_age_s=1.0, stuck_after_s=600)[0] is True
    assert health(stats, last_pass_age_s=700.0, stuck_after_s=600) == (False, "no routing pass for 700 s")
    queue.enqueue("stuck")
    queue.update("stuck", enqueued_at=now - 900)
    ok, reason = health(queue.stats(now=now), last_pass_age_s=1.0, stuck_after_s=600)
    assert not ok and reason == "an instance has been due for 900 s"
    assert queue.stats(now=now).by_state == {"pending": 2}
