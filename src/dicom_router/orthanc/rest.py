"""The few Orthanc REST calls the router makes (Orthanc 1.10 API), with typed failures.

``OrthancUnavailable`` means "Orthanc cannot answer now, keep the work and retry"; a 404 on an instance
is ``InstanceGone`` (deleted by a user: nothing to route).
"""

from __future__ import annotations

from typing import Any

import httpx

from dicom_router.orthanc.config import Peer


class OrthancUnavailable(RuntimeError):
    """Orthanc refused the connection, timed out or answered 5xx."""


class OrthancAuthError(OrthancUnavailable):
    """Orthanc refused the credentials (401/403): reported and retried, since a fixed password or a
    restarted Orthanc with its users restored brings the router back without a restart."""


class InstanceGone(LookupError):
    """The instance is no longer in Orthanc."""


class UnknownModality(LookupError):
    """Orthanc does not know the destination (e.g. restarted without the worker's modalities)."""


class ForwardFailed(RuntimeError):
    """Orthanc could not deliver the instance (the destination refused it or could not be reached)."""


STORE_TIMEOUT_S = 300.0
"""Longer than Orthanc's own DICOM timeouts, so its answer (delivered or not) always comes first."""


def _orthanc_error(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body.get('OrthancError') or body.get('Message')}: {body.get('Details', '')}".strip(": ")
    except ValueError:
        return f"HTTP {response.status_code}"


class OrthancClient:
    def __init__(self, url: str, user: str, password: str, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(auth=(user, password), timeout=timeout_s)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, f"{self.url}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise OrthancUnavailable(f"{self.url}: {exc.__class__.__name__}: {exc}") from None
        if response.status_code >= 500:
            raise OrthancUnavailable(f"{method} {path}: HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code in (401, 403):
            raise OrthancAuthError(f"{method} {path}: HTTP {response.status_code}: credentials refused")
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code == 404:
            raise InstanceGone(path)
        response.raise_for_status()
        return response.json()

    def alive(self) -> bool:
        try:
            return self._request("GET", "/system").status_code == 200
        except OrthancUnavailable:
            return False

    def instance_file(self, instance_id: str) -> bytes:
        response = self._request("GET", f"/instances/{instance_id}/file")
        if response.status_code == 404:
            raise InstanceGone(instance_id)
        response.raise_for_status()
        return response.content

    def instance(self, instance_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._json("GET", f"/instances/{instance_id}")
        return found

    def simplified_tags(self, instance_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._json("GET", f"/instances/{instance_id}/simplified-tags")
        return found

    def parent_study(self, instance_id: str) -> str:
        return str(self._json("GET", f"/instances/{instance_id}/study")["ID"])

    def metadata(self, level: str, resource_id: str) -> dict[str, str]:
        found: dict[str, str] = self._json("GET", f"/{level}/{resource_id}/metadata", params={"expand": ""})
        return found

    def set_metadata(self, level: str, resource_id: str, name: str, value: str) -> None:
        response = self._request("PUT", f"/{level}/{resource_id}/metadata/{name}", content=value.encode())
        if response.status_code == 404:
            raise InstanceGone(resource_id)
        response.raise_for_status()

    def instances(self) -> list[str]:
        found: list[str] = self._json("GET", "/instances")
        return found

    def changes(self, since: int, limit: int = 1000) -> dict[str, Any]:
        found: dict[str, Any] = self._json("GET", "/changes", params={"since": since, "limit": limit})
        return found

    def modalities(self) -> list[str]:
        found: list[str] = self._json("GET", "/modalities")
        return found

    def put_modality(self, name: str, peer: Peer) -> None:
        """Declare a destination Orthanc may send to (and never accepts stores from)."""
        response = self._request("PUT", f"/modalities/{name}", json=peer.as_orthanc(allow_store=False))
        response.raise_for_status()

    def store(self, modality: str, instance_id: str) -> None:
        """C-STORE one instance to ``modality`` and wait for the destination's answer (in the router's
        worker threads: Orthanc's ingest and the stored-instance callback never wait on it)."""
        try:
            response = self.http.post(
                f"{self.url}/modalities/{modality}/store",
                json={"Resources": [instance_id], "Synchronous": True, "Permissive": False},
                timeout=STORE_TIMEOUT_S,
            )
        except httpx.HTTPError as exc:
            raise OrthancUnavailable(f"{self.url}: {exc.__class__.__name__}: {exc}") from None
        if response.status_code in (401, 403):
            raise OrthancAuthError(f"store: HTTP {response.status_code}: credentials refused")
        if response.status_code in (400, 404) and "modality" in response.text.lower():
            raise UnknownModality(modality)
        if response.status_code == 404:  # deleted since it was decided
            raise InstanceGone(instance_id)
        if response.status_code != 200:
            raise ForwardFailed(_orthanc_error(response))

    def store_outcomes(self) -> dict[str, str]:
        """State of the newest C-STORE job Orthanc remembers per instance (``Success``, ``Running``,
        ``Failure``…): how a store whose answer was lost is confirmed instead of sent again."""
        jobs: list[dict[str, Any]] = self._json("GET", "/jobs", params={"expand": ""})
        outcomes: dict[str, str] = {}
        for job in sorted(jobs, key=lambda j: str(j.get("CreationTime", ""))):
            if job.get("Type") == "DicomModalityStore":
                for resource in job.get("Content", {}).get("ParentResources", []):
                    outcomes[str(resource)] = str(job.get("State"))
        return outcomes

    def close(self) -> None:
        self.http.close()
