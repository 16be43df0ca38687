"""Wiring the router from settings: the queue, Orthanc, the model server; run until SIGTERM."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dicom_router import stack
from dicom_router.config import Settings
from dicom_router.monitoring.inference_log import InferenceLog, InstanceLogger
from dicom_router.routing.health import HealthServer
from dicom_router.routing.queue import RoutingQueue
from dicom_router.routing.rules import RoutingRules
from dicom_router.routing.worker import Router
from dicom_router.serving.client import ModelClient


def router(settings: Settings, rules: RoutingRules, logger: InstanceLogger) -> Router:
    return Router(
        settings=settings,
        rules=rules,
        orthanc=stack.orthanc_client(settings),
        model=ModelClient(stack.model_server_url(settings)),
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


def drain(settings: Settings, rules: RoutingRules, timeout_s: float = 600.0) -> dict[str, int]:
    with inference_logger(settings) as logger:
        return router(settings, rules, logger).drain(timeout_s)


def run_forever(settings: Settings, rules: RoutingRules) -> None:
    """Route until SIGTERM, serving ``/health`` and ``/metrics`` meanwhile."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with inference_logger(settings) as logger:
        worker = router(settings, rules, logger)

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
        ):
            worker.run(stop)
