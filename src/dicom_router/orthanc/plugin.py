"""Orthanc ``PythonScript``: put each stored instance's id in the routing queue, nothing else.

The stored-instance callback runs inside Orthanc's ingest; a model call or a synchronous REST call here
would stall every other store (FACTS.md), so the only work is one SQLite insert. The routing worker,
a separate process, does everything else. Settings come from the ``DicomRouter`` section of Orthanc's
configuration, which ``dicom_router.orthanc.config`` writes.
"""

import json
import sys
from pathlib import Path

import orthanc  # provided by Orthanc's embedded interpreter

_settings = json.loads(orthanc.GetConfiguration()).get("DicomRouter", {})
for _entry in reversed(_settings.get("SysPath", [])):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)

from dicom_router.routing.queue import RoutingQueue  # noqa: E402  (needs the sys.path above)

_queue = RoutingQueue(Path(_settings["Queue"]))


def on_stored_instance(_dicom: object, instance_id: str) -> None:
    _queue.enqueue(instance_id)


orthanc.RegisterOnStoredInstanceCallback(on_stored_instance)
orthanc.LogWarning(f"dicom-router: queueing stored instances in {_queue.path}")
