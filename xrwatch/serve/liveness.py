"""Liveness: the heartbeat thread, ``/healthz`` and the status line.

Owns how the daemon shows it is alive and well. The main loop marks its progress
(:meth:`Liveness.progress`, also while it sleeps through a back-off); a heartbeat thread
sends systemd's ``WATCHDOG=1``, the ledger heartbeat (claims of a silent daemon expire
after the lease) and ``STATUS=`` on time however busy the main thread is, as long as the
loop has shown progress within ``LOOP_STALE_SECONDS`` (a hung loop stops the pings, and
systemd restarts the daemon). :class:`Standing` is what the other rooms learn about the
daemon's state (counts, the last ledger or report failure, results held back); it is the
source of ``/healthz``'s problems and notes and of the status line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xrwatch.serve import sdnotify
from xrwatch.serve.ledger import Ledger
from xrwatch.serve.metrics import Metrics, health_check

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0  # ledger heartbeat (claims of a silent daemon expire after the lease)
STATUS_SECONDS = 10.0  # sd_notify STATUS= refresh
LOOP_STALE_SECONDS = 60.0  # no loop progress this long: no more pings, /healthz 503
RETRY_MAX_SECONDS = 30.0  # back-off ceiling when the engine, ledger or reports fail


@dataclass
class Standing:
    """The daemon's state as health and status report it, written by the room that
    learns each fact (the pipeline the counts and ledger failures, the delivery the
    report failures and held rows, the heartbeat its own failures)."""

    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0})
    ledger_error: str | None = None  # the last outcome write failed with this
    heartbeat_error: str | None = None  # the last ledger heartbeat failed with this
    report_error: str | None = None  # the last report write failed with this
    unreported: int = 0  # results not in the reports ...
    held: int = 0  # ... of which held back (their report could not be written)
    overlays_held: int = 0  # results held back until their heatmap can be written

    def problems(self) -> list[str]:
        """What makes the daemon unhealthy now."""
        found = []
        if self.report_error is not None:
            found.append(
                f"results cannot be written to the reports ({self.report_error}); "
                f"{self.unreported} result(s) held back"
            )
        for error in (self.ledger_error, self.heartbeat_error):
            if error is not None:
                found.append(error)
        return found

    def notes(self) -> list[str]:
        """What a healthy answer adds after ``ok``."""
        found = []
        if self.held:
            found.append(
                f"{self.held} result(s) held back: their report could not be written "
                "(see xrwatch status); the other files go on"
            )
        if self.overlays_held:
            found.append(
                f"{self.overlays_held} result(s) held back until their heatmap can be written"
            )
        return found

    def status_line(self, waiting: int, provider: str) -> str:
        held = self.unreported if self.report_error else self.held
        errors = self.counts["error"]
        return (
            f"{self.counts['ok']} ok, {errors} error{'' if errors == 1 else 's'} since start; "
            f"{waiting} waiting; provider {provider}"
            + (f"; {held} result(s) not written to the reports" if held else "")
        )


class Liveness:
    """The main loop's last sign of life and the heartbeat thread that reports it."""

    def __init__(self, standing: Standing, metrics: Metrics, ready: threading.Event) -> None:
        self.standing = standing
        self.metrics = metrics
        self.ready = ready  # systemd hears from the heartbeat from READY=1 on
        self.last_tick = time.monotonic()
        self.watchdog: float | None = None
        self._next_heartbeat = self._next_watchdog = self._next_status = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ledger: Ledger | None = None
        self._status: Callable[[], str] = str

    # -- the main loop's side ----------------------------------------------------------
    def progress(self) -> None:
        """The main thread is working (the heartbeat thread pings while this is recent)."""
        self.last_tick = time.monotonic()

    def tick(self) -> None:
        """One pass of the main loop."""
        self.progress()
        self.metrics.last_tick.set(time.time())

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a back-off) without looking hung."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.2))
            self.progress()

    def health(self, watch_alive: Callable[[], bool]) -> tuple[bool, str]:
        """What ``/healthz`` answers: (healthy, reason)."""
        return health_check(
            lambda: self.last_tick,
            watch_alive,
            stale_after=LOOP_STALE_SECONDS,
            problems=self.standing.problems,
            notes=self.standing.notes,
        )()

    # -- the heartbeat thread ----------------------------------------------------------
    def start(self, ledger: Ledger, status: Callable[[], str]) -> None:
        """Start the heartbeat thread: ``ledger`` gets its heartbeat, systemd ``status()``."""
        self._ledger, self._status = ledger, status
        self.watchdog = sdnotify.watchdog_interval()
        now = time.monotonic()
        self.last_tick = now
        self._next_heartbeat = self._next_watchdog = self._next_status = now
        self._thread = threading.Thread(
            target=self._beat_loop, name="xrwatch-heartbeat", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat_loop(self) -> None:
        """The heartbeat thread: watchdog pings, ledger heartbeat and STATUS= on time."""
        tick = min(0.5, self.watchdog / 2) if self.watchdog is not None else 0.5
        while not self._stop.wait(tick):
            self._beat()

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self.last_tick > LOOP_STALE_SECONDS:
            return  # the main loop is stuck: let systemd's watchdog see it
        if now >= self._next_heartbeat and self._ledger is not None:
            try:
                self._ledger.heartbeat()
                self.standing.heartbeat_error = None
            except Exception as exc:
                logger.error("ledger heartbeat failed: %s", exc)
                self.standing.heartbeat_error = f"cannot write the ledger heartbeat ({exc})"
            self._next_heartbeat = now + HEARTBEAT_SECONDS
        if not self.ready.is_set():
            return  # systemd hears from us from READY=1 on
        if self.watchdog is not None and now >= self._next_watchdog:
            sdnotify.notify("WATCHDOG=1")
            self._next_watchdog = now + self.watchdog
        if now >= self._next_status:
            sdnotify.notify(f"STATUS={self._status()}")
            self._next_status = now + STATUS_SECONDS
