"""The folder daemon's lifecycle: start, wire the rooms, run the loop, shut down.

Threads: the watchdog observer feeds a :class:`StabilityTracker`; a pool of ``workers``
threads reads each ready file once, hashes, claims (in the ledger) and decodes those
bytes (:mod:`.intake`; the decode itself in a process per thread with a DICOM port,
:mod:`.decoders`); the main thread batches decoded inputs into the inference engine
while the workers decode the next ones and records outcomes in the ledger
(:mod:`.pipeline`, :mod:`.outcomes`), writes the reports and archives inputs
(:mod:`.delivery`); a heartbeat thread keeps systemd and the ledger told (:mod:`.liveness`).
This module checks the folders (:mod:`.folders`), builds those rooms and runs the loop that
moves work between them; the rooms never import it.

Lifecycle (after watchdog's ``watchmedo``): :meth:`Daemon.run` returns the exit status.
SIGTERM and SIGINT first neutralise further signals, so shutdown happens once, then set the
stop flag that the loop checks between steps. (A flag rather than an exception raised from
the handler: the handler can fire inside a ledger transaction or a report append, and
finishing the step in flight is exactly what shutdown promises.) The daemon then tells
systemd ``STOPPING=1``, stops claiming files, finishes the decodes and the batch in flight,
flushes the reports, stops the observer (``stop(); join()``) and exits 0. SIGHUP does not
stop it (``Restart=on-failure`` would leave it down): it is logged and ignored, as there is
nothing to reopen (logs go to stderr) and no setting that is safe to change while running.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from xrwatch.serve import sdnotify
from xrwatch.serve.config import ServeConfig
from xrwatch.serve.decoders import Decoders
from xrwatch.serve.delivery import Delivery
from xrwatch.serve.folders import check_folders
from xrwatch.serve.intake import Intake, Work
from xrwatch.serve.ledger import FinishHook, Ledger
from xrwatch.serve.liveness import Liveness, Standing
from xrwatch.serve.metrics import Metrics, MetricsServer
from xrwatch.serve.names import escape_name
from xrwatch.serve.outcomes import Engine, Outcomes
from xrwatch.serve.pipeline import Pipeline
from xrwatch.serve.reports import ReportWriter
from xrwatch.serve.stability import StabilityTracker, signature
from xrwatch.serve.watcher import FolderWatcher

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_SOME_FAILED = 1

ONCE_REPORT_TRIES = 3  # with --once, give up writing reports after this many failed tries
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service(Protocol):
    """Something that runs beside the loop (the DICOM node)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


def load_engine(config: ServeConfig) -> Engine:
    """Load the model named in ``config`` (raises ModelError/ProviderError clearly)."""
    from xrwatch.engine import InferenceEngine

    if config.triton:  # the model runs on a Triton fleet (xrwatch.remote, docs/triton.md)
        from xrwatch.remote.options import triton_engine

        return triton_engine(
            ",".join(config.triton),
            config.triton_model,
            low_confidence=config.low_confidence,
            scope_guard=config.scope_guard,
            require_gpu=config.provider == "cuda",
            retry_for=10.0,  # then the pipeline's own retry, with the files still claimed
        )
    return InferenceEngine(
        config.model,
        use_gpu=config.provider != "cpu",
        require_gpu=config.provider == "cuda",
        low_confidence=config.low_confidence,
        scope_guard=config.scope_guard,
    )


class Daemon:
    """One ``xrwatch serve`` process. Build it, then call :meth:`run` once."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        engine_factory: Callable[[ServeConfig], Engine] = load_engine,
    ) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the model is loaded and the watch is live
        self._wake = threading.Event()
        self.metrics = Metrics()
        self.standing = Standing()
        self.counts = self.standing.counts
        self.liveness = Liveness(self.standing, self.metrics, self.ready)
        self._inflight: set[cf.Future[Work]] = set()
        self._next_rescan = 0.0
        self._started = False
        self._hup = threading.Event()
        self.server: MetricsServer | None = None
        # Extensions (xrwatch.dicom): services run beside the loop, started once the watch
        # is live and stopped first at shutdown; finish hooks run inside the ledger
        # transaction that records outcomes.
        self.services: list[Service] = []
        self.finish_hooks: list[FinishHook] = []

    # -- start-up ----------------------------------------------------------------------
    def _start(self) -> None:
        cfg = self.config
        self.incoming = check_folders(cfg)
        if cfg.metrics_port is not None:  # first: a port in use is a start-up error (exit 2)
            self.server = MetricsServer(
                self.metrics, cfg.metrics_host, cfg.metrics_port, self.health
            )
        self.engine = self._engine_factory(cfg)
        self.classes = list(self.engine.classes)
        self.spec = self.engine.spec
        meta = getattr(self.engine, "meta", None)  # a test's stand-in engine may have none
        source = getattr(self.engine, "path", cfg.model)  # Triton: triton:NAME@VERSION
        # every report row names the model: <arch>-<experiment>-<precision> (file name)
        self.model_name = f"{meta.name} ({source.name})" if meta else cfg.model.name
        collector = getattr(self.engine, "collector", None)  # Triton: per-server metrics
        if collector is not None:
            self.metrics.registry.register(collector())
        logger.info(
            "model %s (%s): classes %s, input %dx%d, provider %s",
            source,
            self.model_name,
            ",".join(self.classes),
            self.spec.size,
            self.spec.size,
            self.engine.provider,
        )
        self.writer = ReportWriter(cfg.reports, self.classes)
        self.writer.check_writable()
        self.writer.claim_for_model(cfg.model, self.engine.model_sha256)
        self.ledger = Ledger(cfg.state_path, lease_seconds=cfg.lease_seconds)
        self.ledger.register(self.incoming)
        self.ledger.retry_held_reports()  # whatever held them may have been fixed
        self.metrics.model.info(
            {
                "model": str(source.name),
                "model_sha256": self.engine.model_sha256,
                "provider": self.engine.provider,
            }
        )
        self.tracker = StabilityTracker(cfg.stable_seconds)
        self.watcher = FolderWatcher(
            self.incoming,
            self.tracker,
            ignore=cfg.ignore_patterns,
            skip=self._known_finished,
            poll=cfg.poll,
            poll_interval=cfg.poll_interval,
        )
        self.decoders = Decoders(self.spec, cfg.decode_in, dicom_port=cfg.dicom_port is not None)
        logger.info(
            "%d worker(s) decode %s (decode_in = %s)",
            cfg.workers,
            "each in a process of its own" if self.decoders.processes else "in threads",
            cfg.decode_in,
        )
        self.intake = Intake(
            cfg, self.incoming, self.ledger, self.decoders, self.watcher.relative, self._stop
        )
        self.delivery = Delivery(
            cfg, self.incoming, self.writer, self.ledger, self.tracker,
            self.standing, self.metrics, self.liveness.progress,
        )  # fmt: skip
        self.pipeline = Pipeline(
            cfg,
            self.engine,
            Outcomes(self.engine, self.model_name, cfg.reports, heatmaps=cfg.heatmaps),
            self.ledger,
            self.delivery,
            finish_hooks=self.finish_hooks,
            standing=self.standing,
            metrics=self.metrics,
            liveness=self.liveness,
            stop=self._stop,
            wake=self._wake,
        )
        self.delivery.flush()  # reconcile: finish any report append a crash interrupted
        if cfg.dicom_enabled:
            from xrwatch.dicom.node import attach

            attach(self)

    def offer_complete(self, path: Path) -> None:
        """A file written complete into INCOMING by this process (e.g. a DICOM C-STORE)."""
        self.tracker.offer(path, complete=True)
        self._wake.set()

    def _known_finished(self, rel: str, st: os.stat_result) -> bool:
        if self.config.archive is not None:
            return False  # a finished file still here must still be moved
        return self.ledger.is_finished(escape_name(rel), *signature(st))

    def _close_early(self) -> None:
        """Release what a failed start-up took (the metrics port, the reports share)."""
        if self.server is not None:
            self.server.stop()
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.close()
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.release()
        ledger = getattr(self, "ledger", None)
        if ledger is not None:
            with contextlib.suppress(Exception):
                ledger.unregister()
            ledger.close()

    # -- signals -----------------------------------------------------------------------
    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._hup.set()  # logged by the loop, not here (the handler may interrupt logging)
        self._wake.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        for sig in _HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # shutdown happens once
        logger.info(
            "received %s: finishing the files in flight, then exiting", signal.Signals(signum).name
        )
        self.request_stop()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- health and status ---------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """What ``/healthz`` answers: (healthy, reason)."""
        healthy, reason = self.liveness.health(
            lambda: self.config.once or not self._started or self.watcher.alive()
        )
        for service in self.services:  # the DICOM node: its problems and notes (degraded)
            found: list[str] = getattr(service, "problems", list)()
            if found:
                prefix = f"{reason}; " if not healthy else "unhealthy: "
                healthy, reason = False, prefix + "; ".join(found)
            elif healthy:
                reason += "".join(f"; {n}" for n in getattr(service, "notes", list)())
        fleet = getattr(getattr(self, "engine", None), "health", None)  # Triton: its servers
        if fleet is None:
            return healthy, reason
        usable, servers = fleet()
        if healthy and not usable:
            return False, f"unhealthy: triton: {servers}"
        return healthy and usable, f"{reason}; triton: {servers}"

    def status_line(self) -> str:
        provider = self.engine.provider
        fleet = getattr(self.engine, "health", None)  # Triton: how many servers answer
        if fleet is not None:
            provider = f"{provider} ({fleet()[1]})"
        return self.standing.status_line(self._queue_depth(), provider)

    def _queue_depth(self) -> int:
        pipeline = getattr(self, "pipeline", None)
        return len(self.tracker) + len(self._inflight) + (len(pipeline) if pipeline else 0)

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> int:
        """Start, serve until stopped (or, with ``once``, until the backlog is done)."""
        cfg = self.config
        try:
            self._start()
        except BaseException:
            self._close_early()
            raise
        self._started = True
        self._next_rescan = time.monotonic() + cfg.rescan_interval
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._on_signal) for sig in _HANDLED_SIGNALS}
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
        self.liveness.start(self.ledger, self.status_line)
        pool = cf.ThreadPoolExecutor(cfg.workers, thread_name_prefix="xrwatch-decode")
        previous_hook = threading.excepthook
        threading.excepthook = self._thread_died
        try:
            if self.server is not None:
                self.server.start()
            if not cfg.once:
                try:
                    self.watcher.start()
                except Exception as exc:  # e.g. the inotify watch limit; rescans still work
                    logger.error(
                        "cannot watch %s (%s: %s); rescanning every %g s and retrying",
                        cfg.incoming,
                        type(exc).__name__,
                        exc,
                        cfg.rescan_interval,
                    )
            backlog = self.watcher.scan()
            logger.info(
                "backlog: %d file(s) in %s; %s",
                backlog,
                cfg.incoming,
                "processing them and exiting (--once)" if cfg.once else "watching for more",
            )
            for service in self.services:
                service.start()
            sdnotify.notify(f"READY=1\nSTATUS={self.status_line()}")
            self.ready.set()
            self._loop(pool)
        finally:
            self._stop.set()
            # at once, not after the drain: systemd knows we are stopping while we drain
            sdnotify.notify("STOPPING=1\nSTATUS=stopping: finishing the files in flight")
            for service in reversed(self.services):
                try:
                    service.stop()
                except Exception:
                    logger.exception("stopping %s failed", type(service).__name__)
            try:
                self._drain()
            finally:
                pool.shutdown(wait=True)
                self.decoders.close()
                self.pipeline.close()
                self.watcher.stop()
                if self.server is not None:
                    self.server.stop()
                self.liveness.stop()
                sdnotify.notify(f"STATUS=stopped: {self.status_line()}")
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                threading.excepthook = previous_hook
                try:
                    self.ledger.unregister()
                except Exception as exc:
                    logger.error("cannot unregister from the ledger: %s", exc)
                self.delivery.count_unreported()
                self.ledger.close()
                self.writer.release()
        logger.info("stopped: %s", self.status_line())
        unreported = self.standing.unreported
        if unreported:
            logger.error(
                "%d result(s) are recorded in the ledger but not in %s (their report could not "
                "be written); they are written at the next start",
                unreported,
                cfg.reports,
            )
        if cfg.once and (self.counts["error"] or unreported):
            return EXIT_SOME_FAILED
        return EXIT_OK

    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        """A thread (the observer's, say) ended by an exception: say so, and rescan now
        (the rescan restarts a watch whose thread died)."""
        name = args.thread.name if args.thread is not None else "?"
        logger.critical(
            "thread %s died (%s: %s); restarting the watch on the next rescan",
            name,
            args.exc_type.__name__,
            args.exc_value,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
            if args.exc_value is not None
            else None,
        )
        self._next_rescan = 0.0
        self._wake.set()

    def _loop(self, pool: cf.ThreadPoolExecutor) -> None:
        cfg = self.config
        pipeline, delivery = self.pipeline, self.delivery
        max_inflight = cfg.workers * 2 + cfg.batch_size
        while not self._stop.is_set():
            self._wake.clear()
            self.liveness.tick()  # every pass, also when full batches keep coming
            if self._hup.is_set():
                self._hup.clear()
                logger.info(
                    "received SIGHUP: ignored (logs go to stderr, nothing to reopen; "
                    "restart the service to apply a changed configuration or model)"
                )
            self._collect()
            room = max_inflight - len(self._inflight)
            if room > 0:
                for cand in self.tracker.take_ready(room):
                    fut = pool.submit(self.intake.prepare, cand)
                    fut.add_done_callback(lambda _f: self._wake.set())
                    self._inflight.add(fut)
            now = time.monotonic()
            if pipeline.due(now):
                pipeline.begin_due()
                continue
            pipeline.finish_ready()
            pipeline.retry_overlays(now)  # results held until their heatmap can be written
            if delivery.retry_at and now >= delivery.retry_at:
                delivery.flush()
            if now >= self._next_rescan:
                try:
                    if not cfg.once:
                        self.watcher.ensure_alive()
                    self.watcher.scan()
                except Exception:  # no scan may end the loop
                    logger.exception("rescan of %s failed; trying again later", cfg.incoming)
                if not delivery.retry_at:
                    delivery.flush()  # held rows that are due again
                self._next_rescan = now + cfg.rescan_interval
            self.metrics.queue_depth.set(self._queue_depth())
            if cfg.once and not self._inflight and pipeline.idle() and not len(self.tracker):
                if delivery.retry_at and delivery.failures < ONCE_REPORT_TRIES:
                    self._wake.wait(0.2)
                    continue
                break
            timeout = 0.05 if len(self.tracker) else 0.5
            if pipeline.batch_started is not None:
                timeout = min(timeout, max(0.0, pipeline.batch_started + cfg.max_wait - now))
            self._wake.wait(timeout)

    def _collect(self) -> None:
        for fut in [f for f in self._inflight if f.done()]:
            self._inflight.discard(fut)
            try:
                work = fut.result()
            except Exception:  # prepare catches file errors; this is a bug or the ledger
                logger.exception("worker failed; the file will be retried on the next rescan")
                continue
            self._handle(work)

    def _handle(self, work: Work) -> None:
        if work.kind in ("input", "error"):
            self.intake.taken(work)
            self.pipeline.add(work)
        elif work.kind == "requeue":
            self.intake.waiting(work)
            self.tracker.offer(work.cand.path, delay=work.delay, seen_at=work.cand.seen_at)
        elif work.kind == "done":
            self.delivery.seen_again(work)
        elif work.kind == "own_output":
            self.delivery.own_output(work)

    def _drain(self) -> None:
        """Finish what is in flight: decodes already claimed, then the last batches."""
        if not self._started:
            return
        if self._inflight:
            logger.info("finishing %d file(s) in flight", len(self._inflight))
        cf.wait(self._inflight)
        self._collect()
        self.pipeline.drain()
        if self.delivery.retry_at:
            self.delivery.flush()


def serve(config: ServeConfig) -> int:
    """Run the daemon with ``config``; return the exit status."""
    return Daemon(config).run()
