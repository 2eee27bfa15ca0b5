"""Prometheus metrics and ``/healthz`` for ``--metrics-port`` (prometheus-client).

Metrics live in their own registry, so several daemons in one process (tests) never clash.
``/healthz`` answers 200 while the daemon's loop has ticked within ``stale_after`` seconds,
its watch is alive, results can be written to the reports and the ledger can be written;
else 503 with the reason. (See :meth:`xrwatch.serve.daemon.Daemon.health`.)

The server bounds what idle or slow clients can hold: a connection silent for
``IDLE_TIMEOUT`` seconds is closed, and so is every connection ``REQUEST_DEADLINE``
seconds after it was accepted, however it trickles (the idle timeout restarts with each
byte). At most ``MAX_CONNECTIONS`` are served at once: with every slot taken, the oldest
connection still sending its request (none complete yet, none waiting unread) is closed for
the new one if it is older than ``EVICT_AFTER`` (a scrape takes milliseconds), else the new
one is closed; a connection whose complete request has arrived is answered, never evicted.
So clients trickling bytes cannot starve ``/healthz``, and it never keeps a thread per idle
connection. The ages count from the accept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from xrwatch.errors import ConfigError

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)
IDLE_TIMEOUT = 5.0  # seconds a connection may stay silent (a scrape takes milliseconds)
MAX_CONNECTIONS = 16  # connections served at once (see EVICT_AFTER for more)
REQUEST_DEADLINE = 10.0  # seconds a connection may last, whatever it sends
EVICT_AFTER = 1.0  # a connection this old gives its slot to a new one when all are taken


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
        self.unreported = Gauge(
            "xrwatch_results_unreported",
            "Results recorded in the ledger but not yet in the reports (held back because "
            "their report could not be written, or waiting for the next write)",
            registry=self.registry,
        )
        self.own_output = Counter(
            "xrwatch_own_output_skipped",
            "Files in INCOMING made by xrwatch (its SR or heatmap SC routed back): skipped, "
            "not classified",
            registry=self.registry,
        )
        self.report_write_failures = Counter(
            "xrwatch_report_write_failures",
            "Attempts to write reports that failed (whole writes and single held rows)",
            registry=self.registry,
        )
        self.flagged = Counter(
            "xrwatch_flagged_files",
            "Files reported ok but flagged (low_confidence, out_of_scope)",
            ["flag"],
            registry=self.registry,
        )
        for outcome in ("ok", "error"):
            self.files.labels(outcome)
        for flag in ("low_confidence", "out_of_scope"):
            self.flagged.labels(flag)


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
            timeout = IDLE_TIMEOUT  # applied to the socket: idle connections are closed

            def parse_request(self) -> bool:
                complete = super().parse_request()
                if complete:  # request line and headers read: answered, never evicted
                    server = self.server
                    assert isinstance(server, _BoundedServer)
                    server.answering(self.request)
                return complete

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

        try:
            self._server = _BoundedServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {port}: cannot listen on {host}:{port} "
                f"({exc.strerror or exc}); another process (a second daemon?) may be using "
                "it: choose another port (metrics_port) or stop that process"
            ) from exc
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
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS at once, none older than
    REQUEST_DEADLINE (see the module docstring)."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # id(request) -> [accepted, request, closed, answering (complete request read)]
        self._open: dict[int, list[Any]] = {}
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        now = time.monotonic()
        with self._open_lock:
            live = [e for e in self._open.values() if not e[2]]
            if len(live) >= MAX_CONNECTIONS:
                victim = next(
                    (
                        e
                        for e in sorted(live, key=lambda e: e[0])  # the oldest first
                        if not e[3] and now - e[0] >= EVICT_AFTER and not _request_waiting(e[1])
                    ),
                    None,
                )
                if victim is None:  # a burst, or all being answered: the newcomer waits
                    logger.debug("metrics: %d connections open; closing a new one", len(live))
                    self.shutdown_request(request)
                    return
                _close(victim)  # the oldest slow or stuck client makes room
            self._open[id(request)] = [now, request, False, False]
        super().process_request(request, client_address)

    def answering(self, request: Any) -> None:
        """The handler has read ``request``'s complete request: it is no longer evictable."""
        with self._open_lock:
            entry = self._open.get(id(request))
            if entry is not None:
                entry[3] = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client gone (or closed by us) mid-request is routine; anything else is logged
        as an error (socketserver would print it)."""
        if isinstance(sys.exc_info()[1], OSError):
            logger.debug("metrics: connection from %s ended early", client_address[0])
        else:
            logger.exception("metrics: answering %s failed", client_address[0])

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.pop(id(request), None)

    def service_actions(self) -> None:
        """Called by serve_forever every poll interval: end connections past the deadline."""
        super().service_actions()
        cutoff = time.monotonic() - REQUEST_DEADLINE
        with self._open_lock:
            for entry in self._open.values():
                if entry[0] < cutoff and not entry[2]:
                    _close(entry)


def _request_waiting(request: Any) -> bool:
    """Whether a complete request (headers ended) waits unread in ``request``'s buffer:
    its handler has not run yet (a busy machine), so it is a scrape, not a trickler."""
    try:  # a duplicate without the handler's timeout: peeking never waits for data
        with socket.socket(fileno=os.dup(request.fileno())) as raw:
            data = raw.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:  # nothing waiting (BlockingIOError) or gone
        return False
    return b"\r\n\r\n" in data


def _close(entry: list[Any]) -> None:
    """Shut a connection down: its thread's next read or write ends."""
    entry[2] = True
    with contextlib.suppress(OSError):
        entry[1].shutdown(socket.SHUT_RDWR)


def health_check(
    last_tick: Callable[[], float],
    watch_alive: Callable[[], bool],
    stale_after: float,
    problems: Callable[[], list[str]] = list,
    notes: Callable[[], list[str]] = list,
) -> Callable[[], tuple[bool, str]]:
    """``/healthz``: unhealthy when the loop is stale, the watch is dead or ``problems()``
    names any; healthy otherwise, with ``notes()`` (e.g. rows held back) after ``ok``."""

    def check() -> tuple[bool, str]:
        age = time.monotonic() - last_tick()
        if age > stale_after:
            return False, f"unhealthy: main loop last ticked {age:.0f} s ago"
        if not watch_alive():
            return False, "unhealthy: the folder watch has stopped"
        found = problems()
        if found:
            return False, "unhealthy: " + "; ".join(found)
        extra = notes()
        return True, "ok" + "".join(f"; {n}" for n in extra)

    return check
