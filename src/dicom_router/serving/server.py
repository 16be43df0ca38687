"""Run the predictor with KServe's model server, bound where the deployment says.

KServe's ``ModelServer`` hard-codes 0.0.0.0; the embedded stack binds 127.0.0.1, so this starts KServe's
own REST server (same app, routes, ``/metrics`` and error handlers) with the host set. Typed DICOM
errors become 4xx with the contract's error type; bodies over the configured size are refused with 413
before they are read.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from http import HTTPStatus
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.model_server import app as kserve_app
from kserve.protocol.rest.server import RESTServer
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from dicom_router.config import Settings
from dicom_router.dicom.errors import DicomInputError
from dicom_router.serving.predictor import REJECTED, BodyPartModel

log = logging.getLogger(__name__)

STATUS_BY_TYPE = {"ImageTooLarge": HTTPStatus.REQUEST_ENTITY_TOO_LARGE}
"""Typed input errors map to 422 (the request was understood, the DICOM is unusable), size to 413."""


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """The 4xx body: KServe's ``error`` string plus the contract's typed error."""
    return {"error": f"{error_type}: {message}", "type": error_type, "message": message}


async def _dicom_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, DicomInputError)
    status = STATUS_BY_TYPE.get(exc.type, HTTPStatus.UNPROCESSABLE_ENTITY)
    log.info("refused %s: %s: %s", exc.path, exc.type, exc.reason)
    return JSONResponse(status_code=status, content=error_body(exc.type, f"{exc.path}: {exc.reason}"))


class BodyLimit(BaseHTTPMiddleware):
    """Refuse bodies over the limit from Content-Length alone (a 2 GB upload is never read)."""

    def __init__(self, app: Any, limit: int) -> None:
        super().__init__(app)
        self.limit = limit

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            REJECTED.labels(type="ImageTooLarge").inc()
            return JSONResponse(
                status_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                content=error_body("ImageTooLarge", f"request body {length} bytes exceeds {self.limit}"),
            )
        return await call_next(request)


class Readiness(BaseHTTPMiddleware):
    """``/v2/health/ready`` (the probes' path) answers 503 unless the model is loaded and its decode
    pool works: KServe's own server readiness is always true for a predictor."""

    def __init__(self, app: Any, model: BodyPartModel) -> None:
        super().__init__(app)
        self.model = model

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path == "/v2/health/ready" and not self.model.ready_to_serve():
            return JSONResponse(status_code=HTTPStatus.SERVICE_UNAVAILABLE, content={"ready": False})
        return await call_next(request)


class BoundModelServer(ModelServer):  # type: ignore[misc]
    """KServe's model server on a chosen host; the model registers even before its first version exists."""

    def __init__(self, host: str, port: int, max_request_bytes: int, grace_s: int) -> None:
        super().__init__(http_port=port, enable_grpc=False, workers=1, enable_latency_logging=False)
        self.host = host
        self.max_request_bytes = max_request_bytes
        self.grace_s = grace_s

    def serve(self, model: BodyPartModel) -> None:
        self.register_model(model)
        kserve_app.add_exception_handler(DicomInputError, _dicom_error)
        kserve_app.add_middleware(BodyLimit, limit=self.max_request_bytes)
        kserve_app.add_middleware(Readiness, model=model)
        rest = RESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            grace_period=self.grace_s,
        )
        rest.config.host = self.host
        self._rest_server = rest

        async def run() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: setattr(rest._server, "should_exit", True))
            engine = asyncio.ensure_future(model.start_engine())
            try:
                await rest.start()
            finally:
                engine.cancel()
                model.stop()

        asyncio.run(run())


def serve(settings: Settings, *, model_uri: str | None, host: str, port: int) -> None:
    """Load the model (or wait for it via the alias poll) and serve until SIGTERM: then no new
    connection is accepted, requests in flight finish (at most ``serve_shutdown_grace_s``) and the
    process exits."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # also while loading: as a container's PID 1 a signal
        signal.signal(sig, _exit)  # without a handler is ignored, and the kubelet would have to kill it
    model = BodyPartModel(settings, model_uri)
    model.load()
    log.info("model server on http://%s:%d (model %s)", host, port, model.model_uri)
    BoundModelServer(host, port, settings.serve_max_request_bytes, settings.serve_shutdown_grace_s).serve(
        model
    )
    log.info("model server stopped")


def _exit(signum: int, _frame: object) -> None:
    log.info("%s before serving: exiting", signal.Signals(signum).name)
    raise SystemExit(0)
