"""The few Orthanc REST calls the router makes (Orthanc 1.10 API), with typed failures.

``OrthancUnavailable`` means "Orthanc cannot answer now, keep the work and retry"; a 404 on an instance
is ``InstanceGone`` (deleted by a user: nothing to route).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from dicom_router.orthanc.config import Peer


class OrthancUnavailable(RuntimeError):
    """Orthanc refused the connection, timed out or answered 5xx."""


class InstanceGone(LookupError):
    """The instance is no longer in Orthanc."""


class UnknownModality(LookupError):
    """Orthanc does not know the destination (e.g. restarted without the worker's modalities)."""


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    """Orthanc's job state: Pending, Running, Success, Failure, Paused, Retry."""
    error: str | None


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

    def store(self, modality: str, instance_ids: list[str]) -> str:
        """Start an asynchronous C-STORE job; returns the job id (the callback path never waits on it)."""
        response = self._request(
            "POST",
            f"/modalities/{modality}/store",
            json={"Resources": instance_ids, "Synchronous": False, "Permissive": False},
        )
        if response.status_code in (400, 404) and "modality" in response.text.lower():
            raise UnknownModality(modality)
        response.raise_for_status()
        return str(response.json()["ID"])

    def job(self, job_id: str) -> Job:
        response = self._request("GET", f"/jobs/{job_id}")
        if response.status_code == 404:
            return Job(job_id, "Unknown", "job not found (Orthanc restarted without saving it?)")
        response.raise_for_status()
        body = response.json()
        state = str(body.get("State"))
        error = None if state != "Failure" else f"{body.get('ErrorCode')}: {body.get('ErrorDescription')}"
        return Job(job_id, state, error)

    def close(self) -> None:
        self.http.close()
