"""Wiring the router: the queue, Orthanc, the model server; run until SIGTERM.

Where Orthanc and the model server are is the caller's to say (``Endpoints``): the CLI finds them in
the embedded stack's state or the settings, a pod in its environment. Routing never depends on the
local process manager."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dicom_router.config import Settings
from dicom_router.monitoring.inference_log import InferenceLog, InstanceLogger
from dicom_router.orthanc.rest import OrthancClient
from dicom_router.routing.health import HealthServer
from dicom_router.routing.queue import RoutingQueue
from dicom_router.routing.rules import RoutingRules
from dicom_router.routing.worker import Router
from dicom_router.serving.client import ModelClient


@dataclass(frozen=True)
class Endpoints:
    """The Orthanc (with the routing hook) whose queue is routed, and the model server's URL."""

    orthanc: OrthancClient
    model_url: str


def router(settings: Settings, rules: RoutingRules, logger: InstanceLogger, endpoints: Endpoints) -> Router:
    return Router(
        settings=settings,
        rules=rules,
        orthanc=endpoints.orthanc,
        model=ModelClient(endpoints.model_url),
        queue=RoutingQueue(settings.routing_queue),
        on_classified=logger,
    )


@contextmanager
def inference_logger(settings: Settings) -> Iterator[InstanceLogger]:
    """Every model answer goes to the inference log (drift monitoring); the last batch is written on exit."""
    logger = InstanceLogger(
        InferenceLog(settings.inference_log, settings, flush_after_s=settings.inference_log_flush_s), settings
    )
    try:
        yield logger
    finally:
        logger.close()


def drain(
    settings: Settings, rules: RoutingRules, endpoints: Endpoints, timeout_s: float = 600.0
) -> dict[str, int]:
    with inference_logger(settings) as logger:
        return router(settings, rules, logger, endpoints).drain(timeout_s)


def run_forever(settings: Settings, rules: RoutingRules, endpoints: Endpoints) -> None:
    """Route until SIGTERM, serving ``/health``, ``/metrics`` and the review API meanwhile."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with inference_logger(settings) as logger:
        worker = router(settings, rules, logger, endpoints)

        def lost() -> dict[str, float]:
            """Inference-log records dropped (queue full, storage away) or that failed to decode."""
            return {
                "inference_log_dropped": float(logger.dropped + logger.log.dropped),
                "inference_log_failed": float(logger.failed),
            }

        with HealthServer(
            worker.queue,
            settings.route_host,
            settings.route_port,
            last_pass=lambda: worker.last_pass,
            stuck_after_s=settings.route_stuck_after_s,
            extra=lost,
            review_token=settings.review_token.get_secret_value() if settings.review_token else None,
        ):
            worker.run(stop)
