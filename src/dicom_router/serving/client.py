"""A small synchronous client of the predictor's V2 protocol.

DICOM goes as a BYTES tensor holding base64 text in the JSON body: KServe 0.21's server decodes
binary-extension BYTES inputs as UTF-8 and fails on arbitrary bytes, so binary data is not an option.

The routing worker and the benchmarks use it; it speaks the protocol's JSON directly (``protocol`` holds
the names), so the router needs neither kserve nor torch. A typed 4xx from the server comes back as the same
``DicomInputError`` subclass; an outage (refused connection, no model loaded, 503) is
``ModelUnavailable``; a failure on this request (other 5xx, timeout) is ``ModelFailed``.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from dicom_router.dicom.errors import ERRORS_BY_TYPE, DicomInputError, NotDicom
from dicom_router.serving.protocol import (
    EXTRA_OUTPUTS,
    INPUT,
    MODEL_NAME,
    NOVELTY,
    OUTPUTS,
    REVIEW_THRESHOLD,
    SHADOW_OUTPUTS,
)


class ModelUnavailable(RuntimeError):
    """The model server cannot be reached or has no model loaded: an outage, not this instance's fault;
    the caller keeps the work and retries later."""


class ModelFailed(RuntimeError):
    """The model server failed on this request (5xx, timeout): retried, a bounded number of times."""


@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float
    probabilities: dict[str, float]
    low_confidence: bool
    model_version: str
    novelty: float | None = None
    """Above 1.0: unlike the training images; None when the served bundle does not compute it."""
    review_threshold: float | None = None
    """The served model's own review threshold; None when it has none."""
    embedding: npt.NDArray[np.float32] | None = None
    statistics: dict[str, float] | None = None
    """The image's grey-level facts from the server's decode (asked for with ``embedding``)."""
    shadow_label: str | None = None
    shadow_confidence: float | None = None
    shadow_version: str | None = None
    """The challenger's answer (asked for with ``embedding``), when a model is in shadow."""


class ModelClient:
    """Keep-alive HTTP client of ``/v2/models/bodypart-router/infer``."""

    def __init__(self, url: str, *, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout_s)

    def ready(self) -> bool:
        try:
            return self.http.get(f"{self.url}/v2/models/{MODEL_NAME}/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def classify(self, data: bytes, *, path: str = "dicom", embedding: bool = False) -> Classification:
        wanted = [*OUTPUTS, NOVELTY, *EXTRA_OUTPUTS, *SHADOW_OUTPUTS] if embedding else [*OUTPUTS, NOVELTY]
        body = {
            "inputs": [
                {
                    "name": INPUT,
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(data).decode("ascii")],
                }
            ],
            "outputs": [{"name": name, "parameters": {"binary_data": False}} for name in wanted],
        }
        try:
            response = self.http.post(f"{self.url}/v2/models/{MODEL_NAME}/infer", json=body)
        except httpx.TimeoutException as exc:
            raise ModelFailed(f"{self.url}: {exc.__class__.__name__}: {exc}") from None
        except httpx.HTTPError as exc:
            raise ModelUnavailable(f"{self.url}: {exc.__class__.__name__}: {exc}") from None
        status = response.status_code
        if 400 <= status < 500 and status not in (404, 408, 429):
            raise _typed_error(path, response)
        if status in (404, 429, 503):  # no model loaded yet, overloaded, not ready
            raise ModelUnavailable(f"{self.url}: HTTP {status}: {response.text[:200]}")
        if status != 200:
            raise ModelFailed(f"{self.url}: HTTP {status}: {response.text[:200]}")
        result = response.json()
        out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in result["outputs"]}
        parameters = result.get("parameters") or {}
        labels = str(parameters.get("labels", "")).split(",")
        threshold = parameters.get(REVIEW_THRESHOLD)
        probabilities = out["probabilities"].reshape(-1)
        label = out["label"].reshape(-1)[0]
        return Classification(
            label=label.decode() if isinstance(label, bytes) else str(label),
            confidence=float(out["confidence"].reshape(-1)[0]),
            probabilities={name: float(p) for name, p in zip(labels, probabilities, strict=True)},
            low_confidence=bool(out["low_confidence"].reshape(-1)[0]),
            model_version=str(result.get("model_version")),
            novelty=float(out[NOVELTY].reshape(-1)[0]) if NOVELTY in out else None,
            review_threshold=None if threshold is None else float(threshold),
            embedding=out["embedding"].reshape(-1).astype(np.float32) if embedding else None,
            statistics=parse_statistics(out.get("image_statistics")),
            **_shadow(out),
        )

    def close(self) -> None:
        self.http.close()


def _shadow(out: dict[str, npt.NDArray[Any]]) -> dict[str, Any]:
    """The challenger's answer, when the server had one in shadow."""
    if "shadow_label" not in out:
        return {}
    label, version = out["shadow_label"].reshape(-1)[0], out["shadow_version"].reshape(-1)[0]
    return {
        "shadow_label": label.decode() if isinstance(label, bytes) else str(label),
        "shadow_confidence": float(out["shadow_confidence"].reshape(-1)[0]),
        "shadow_version": version.decode() if isinstance(version, bytes) else str(version),
    }


def parse_statistics(output: npt.NDArray[Any] | None) -> dict[str, float] | None:
    """The server's image statistics (JSON; NaN arrives as null); None when absent or unreadable, so
    the inference log decodes the image itself rather than the classification failing."""
    if output is None or output.size == 0:
        return None
    value = output.reshape(-1)[0]
    try:
        document = json.loads(value.decode() if isinstance(value, bytes) else str(value))
        return {str(k): math.nan if v is None else float(v) for k, v in document.items()}
    except (ValueError, TypeError, AttributeError):
        return None


def _typed_error(path: str, response: httpx.Response) -> DicomInputError:
    try:
        body = response.json()
        cls = ERRORS_BY_TYPE.get(str(body.get("type")), NotDicom)
        return cls(path, str(body.get("message") or body.get("error")))
    except ValueError:
        return NotDicom(path, f"HTTP {response.status_code}: {response.text[:200]}")
