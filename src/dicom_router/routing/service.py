"""Wiring the router from settings: the queue, Orthanc, the model server; run until SIGTERM."""

from __future__ import annotations

import signal
import threading

from dicom_router import stack
from dicom_router.config import Settings
from dicom_router.routing.queue import RoutingQueue
from dicom_router.routing.rules import RoutingRules
from dicom_router.routing.worker import Router
from dicom_router.serving.client import ModelClient


def router(settings: Settings, rules: RoutingRules) -> Router:
    return Router(
        settings=settings,
        rules=rules,
        orthanc=stack.orthanc_client(settings),
        model=ModelClient(stack.model_server_url(settings)),
        queue=RoutingQueue(settings.routing_queue),
    )


def drain(settings: Settings, rules: RoutingRules, timeout_s: float = 600.0) -> dict[str, int]:
    return router(settings, rules).drain(timeout_s)


def run_forever(settings: Settings, rules: RoutingRules) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    router(settings, rules).run(stop)
