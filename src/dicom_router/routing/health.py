"""The router's HTTP endpoint: health and Prometheus metrics (what the stack, the chart's probes and a
Prometheus read to know that routing moves, not merely that the process exists), and the review API.

``/health`` answers 200 while the routing loop keeps making passes and no instance has been due for
longer than ``route_stuck_after_s`` (a back-off delay is not "due", so a model-server outage never
restarts the router); otherwise 503 with the reason. ``/metrics`` reads the queue at scrape time.
``/review…`` (``review.api``) answers only a request bearing the deployment's review token
(``Authorization: Bearer …``); without a configured token it is off (503).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_router.routing import review
from dicom_router.routing.queue import QueueStats, RoutingQueue

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
"""A correction is a few fields: a larger body is refused unread."""


def health(stats: QueueStats, last_pass_age_s: float, stuck_after_s: float) -> tuple[bool, str]:
    """Whether routing is alive, and why not."""
    if last_pass_age_s > stuck_after_s:
        return False, f"no routing pass for {last_pass_age_s:.0f} s"
    if stats.oldest_due_age_s > stuck_after_s:
        return False, f"an instance has been due for {stats.oldest_due_age_s:.0f} s"
    return True, "routing"


class QueueCollector(Collector):
    """Queue depth, oldest due age, attempts, dead letters and deliveries, read at each scrape."""

    def __init__(self, queue: RoutingQueue, extra: Callable[[], dict[str, float]]) -> None:
        self.queue = queue
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        stats = self.queue.stats()
        depth = GaugeMetricFamily("dicom_router_queue_depth", "Queued instances by state", labels=["state"])
        for state, n in stats.by_state.items():
            depth.add_metric([state], n)
        yield depth
        yield GaugeMetricFamily(
            "dicom_router_oldest_due_age_seconds",
            "Age of the oldest instance due for routing now",
            value=stats.oldest_due_age_s,
        )
        yield GaugeMetricFamily(
            "dicom_router_waiting_attempts",
            "Failed attempts of instances still waiting",
            value=stats.attempts,
        )
        yield GaugeMetricFamily(
            "dicom_router_dead_letters", "Instances that exhausted their attempts", value=stats.dead
        )
        delivered = GaugeMetricFamily(
            "dicom_router_forwarded", "Instances delivered, by destination", labels=["destination"]
        )
        for destination, n in stats.delivered.items():
            delivered.add_metric([destination], n)
        yield delivered
        for name, value in self.extra().items():
            yield GaugeMetricFamily(f"dicom_router_{name}", name.replace("_", " "), value=value)


class HealthServer:
    """``/health`` and ``/metrics`` on a thread of their own."""

    def __init__(
        self,
        queue: RoutingQueue,
        host: str,
        port: int,
        *,
        last_pass: Callable[[], float],
        stuck_after_s: float,
        extra: Callable[[], dict[str, float]] = dict,
        review_token: str | None = None,
    ) -> None:
        registry = CollectorRegistry()
        registry.register(QueueCollector(queue, extra))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._answer(200, generate_latest(registry), "text/plain; version=0.0.4")
                elif self.path == "/health":
                    stats = queue.stats()
                    ok, reason = health(stats, time.monotonic() - last_pass(), stuck_after_s)
                    body = {"ok": ok, "reason": reason, "queue": stats.by_state}
                    self._answer(200 if ok else 503, json.dumps(body).encode(), "application/json")
                elif self.path.startswith("/review"):
                    self._review()
                else:
                    self._answer(404, b"not found", "text/plain")

            def do_POST(self) -> None:
                if self.path.startswith("/review"):
                    self._review()
                else:
                    self._answer(404, b"not found", "text/plain")

            def _review(self) -> None:
                status: int
                document: object
                if review_token is None:
                    status, document = 503, {"error": "the review API is off: no review token is configured"}
                elif not hmac.compare_digest(
                    self.headers.get("Authorization", "").encode(), f"Bearer {review_token}".encode()
                ):
                    status, document = 401, {"error": "a review token is required (Authorization: Bearer …)"}
                else:
                    status, document = self._reviewed()
                self._answer(status, json.dumps(document, default=str).encode(), "application/json")

            def _reviewed(self) -> tuple[int, Any]:
                url = urlsplit(self.path)
                body = None
                if self.command == "POST":
                    size = int(self.headers.get("Content-Length") or 0)
                    if size > MAX_BODY:
                        return 413, {"error": f"body over {MAX_BODY} bytes"}
                    try:
                        body = json.loads(self.rfile.read(size) or b"null")
                    except ValueError:
                        return 400, {"error": "the body is not JSON"}
                status, document = review.api(queue, self.command, url.path, dict(parse_qsl(url.query)), body)
                if status == 200 and self.command == "POST":
                    log.info("review: %s %s via the API", url.path.rsplit("/", 1)[-1], document["sop_hash"])
                return status, document

            def _answer(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:  # probes every few seconds: not worth a log line
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="router-health", daemon=True)

    def __enter__(self) -> HealthServer:
        self.thread.start()
        log.info("router health and metrics on http://%s:%d", self.server.server_address[0], self.port)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
