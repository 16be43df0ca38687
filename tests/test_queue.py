"""The routing queue and audit, without Orthanc: idempotent enqueue, due order, backoff, study labels."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_router.routing.eligibility import projection_radiograph
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
    assert [i.instance_id for i in queue.due(10)] == ["first", "second"]
    delays = [queue.retry_later("first", "down", base_s=1.0, cap_s=5.0) for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert [i.instance_id for i in queue.due(10)] == ["second"]
    item = queue.get("first")
    assert item is not None and item.attempts == 5 and item.last_error == "down"
    assert [i.instance_id for i in queue.due(10, now=time.time() + 6)] == ["first", "second"]


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
