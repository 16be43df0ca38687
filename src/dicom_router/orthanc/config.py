"""Orthanc's configuration for the platform (pure: a dict that becomes Orthanc's JSON file).

Security per FACTS.md: HTTP only from localhost with authentication, DICOM stores only from declared
modalities whose host is checked. The router's metadata names are declared as ``UserMetadata`` (Orthanc
1.10 has no labels). ``TCP_NODELAY`` is set in the process environment by the stack, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

USER_METADATA = {
    "BodyPart": 1024,
    "BodyPartConfidence": 1025,
    "ModelVersion": 1026,
    "RoutedTo": 1027,
    "RoutingError": 1028,
    "BodyPartConflict": 1029,
    "BodyPartReviewed": 1030,
    "BodyPartNovelty": 1031,
}
"""The contract's instance metadata, plus ``BodyPartConflict`` on studies whose instances disagree,
``BodyPartReviewed``, a reviewer's label (set in Orthanc Explorer, or by the router for a correction),
and ``BodyPartNovelty``, how unlike the model's training images the instance is (above the rules'
``review.above_novelty``: review)."""

PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")


@dataclass(frozen=True)
class Peer:
    """A DICOM node: who may store to Orthanc, or where Orthanc forwards."""

    aet: str
    host: str
    port: int

    def as_orthanc(self, *, allow_store: bool) -> dict[str, Any]:
        return {
            "AET": self.aet,
            "Host": self.host,
            "Port": self.port,
            "AllowEcho": True,
            "AllowFind": False,
            "AllowGet": False,
            "AllowMove": False,
            "AllowStore": allow_store,
            "AllowStorageCommitment": False,
        }


JOBS_HISTORY = 5000
"""Finished jobs Orthanc remembers: the router confirms a store whose answer it lost (a crash mid-send)
by finding its job here, so this must outlast a router's lease at full rate (default 10 would not)."""


def orthanc_config(
    *,
    name: str,
    aet: str,
    http_port: int,
    dicom_port: int,
    storage_dir: Path,
    users: dict[str, str],
    senders: dict[str, Peer],
    queue_path: Path | None = None,
    sys_path: list[str] | None = None,
) -> dict[str, Any]:
    """One Orthanc; with ``queue_path`` it loads the Python plugin that feeds the routing queue."""
    config: dict[str, Any] = {
        "Name": name,
        "StorageDirectory": str(storage_dir),
        "IndexDirectory": str(storage_dir),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": users,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {key: peer.as_orthanc(allow_store=True) for key, peer in senders.items()},
        "DicomModalitiesInDatabase": False,
        "UserMetadata": USER_METADATA,
        "StableAge": 5,
        "SaveJobs": True,
        "JobsHistorySize": JOBS_HISTORY,
        "ConcurrentJobs": 4,
        "HttpsVerifyPeers": True,
        # gzip on every answer cost Orthanc and the router CPU per instance on loopback and in-cluster
        # links alike: bench/routing.py's chain went from 15 to 18 instances/s on 2 cores without it
        "HttpCompressionEnabled": False,
        "Plugins": [],
    }
    if queue_path is not None:
        config["Plugins"] = [str(PYTHON_PLUGIN)]
        config["PythonScript"] = str(Path(__file__).with_name("plugin.py"))
        config["PythonVerbose"] = False
        config["DicomRouter"] = {"Queue": str(queue_path), "SysPath": sys_path or []}
    return config
