"""Prometheus metrics and ``/healthz`` for ``--metrics-port`` (prometheus-client).

Metrics live in their own registry, so several daemons in one process (tests) never clash.
``/healthz`` answers 200 while the daemon's loop has ticked within ``stale_after`` seconds
and its watch is alive, else 503.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """The daemon's counters and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.files = Counter(
            "xrwatch_files", "Files reported, by outcome", ["outcome"], registry=self.registry
        )
        self.latency = Histogram(
            "xrwatch_latency_seconds",
            "Seconds from a file being first seen to its report row",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "xrwatch_batch_inference_seconds", "Seconds per inference batch", registry=self.registry
        )
        self.queue_depth = Gauge(
            "xrwatch_queue_depth",
            "Files waiting (stability + decoding + batch)",
            registry=self.registry,
        )
        self.model = Info("xrwatch_model", "Model and execution provider", registry=self.registry)
        self.last_tick = Gauge(
            "xrwatch_loop_last_tick_timestamp_seconds", "Last loop tick", registry=self.registry
        )
        for outcome in ("ok", "error"):
            self.files.labels(outcome)


class MetricsServer:
    """A small threaded HTTP server: ``/metrics`` and ``/healthz``."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        healthy: Callable[[], tuple[bool, str]],
    ) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif self.path.split("?")[0] == "/healthz":
                    ok, detail = healthy()
                    body, ctype = (detail + "\n").encode(), "text/plain; charset=utf-8"
                    code = 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                logger.debug("metrics: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="xrwatch-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        logger.info(
            "metrics on http://%s:%d/metrics and /healthz", *self._server.server_address[:2]
        )

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def health_check(
    last_tick: Callable[[], float], watch_alive: Callable[[], bool], stale_after: float
) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        age = time.monotonic() - last_tick()
        if age > stale_after:
            return False, f"unhealthy: main loop last ticked {age:.0f} s ago"
        if not watch_alive():
            return False, "unhealthy: the folder watch has stopped"
        return True, "ok"

    return check
