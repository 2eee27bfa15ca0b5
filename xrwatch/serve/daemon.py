"""The folder daemon: find files, wait until complete, claim, decode, batch, infer, report.

Threads: the watchdog observer feeds a :class:`StabilityTracker`; a pool of ``workers``
threads reads each ready file once, hashes, claims (in the ledger) and decodes those
bytes through :func:`xrwatch.preprocess.load_model_input`; the main thread batches decoded
inputs into the inference engine while the workers decode the next ones, records outcomes
in the ledger, writes the reports and archives inputs.

Lifecycle (after watchdog's ``watchmedo``): :meth:`Daemon.run` returns the exit status.
SIGTERM and SIGINT first neutralise further signals, so shutdown happens once, then set the
stop flag that the loop checks between steps. (A flag rather than an exception raised from
the handler: the handler can fire inside a ledger transaction or a report append, and
finishing the step in flight is exactly what shutdown promises.) The daemon then tells
systemd ``STOPPING=1``, stops claiming files, finishes the decodes and the batch in flight,
flushes the reports, stops the observer (``stop(); join()``) and exits 0. SIGHUP does not
stop it (``Restart=on-failure`` would leave it down): it is logged and ignored, as there is
nothing to reopen (logs go to stderr) and no setting that is safe to change while running.

Liveness: a heartbeat thread sends systemd's ``WATCHDOG=1`` and the ledger heartbeat on
time however busy the main thread is, as long as the main loop has shown progress within
``LOOP_STALE_SECONDS`` (a hung loop stops the pings, and systemd restarts the daemon).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import logging
import os
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol

import numpy as np

from xrwatch.errors import (
    ConfigError,
    ImageError,
    ModelError,
    ReportWriteError,
    TruncatedImageError,
    XRWatchError,
)
from xrwatch.fields import DICOM_IDS
from xrwatch.filehash import read_and_hash
from xrwatch.preprocess import PreprocessSpec, load_model_input
from xrwatch.safetext import printable
from xrwatch.serve import sdnotify
from xrwatch.serve.archive import move_to_archive
from xrwatch.serve.config import ServeConfig
from xrwatch.serve.ledger import FinishHook, Ledger, LedgerError
from xrwatch.serve.metrics import Metrics, MetricsServer, health_check
from xrwatch.serve.reports import ReportWriter
from xrwatch.serve.stability import Candidate, StabilityTracker
from xrwatch.serve.watcher import FolderWatcher

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_SOME_FAILED = 1

HEARTBEAT_SECONDS = 5.0  # ledger heartbeat (claims of a silent daemon expire after the lease)
STATUS_SECONDS = 10.0  # sd_notify STATUS= refresh
RETRY_MAX_SECONDS = 30.0  # back-off ceiling when the engine, ledger or reports fail
LOOP_STALE_SECONDS = 60.0  # no loop progress this long: no more pings, /healthz 503
HELD_RETRY_SECONDS = 60.0  # a row whose report could not be written is tried again after this
ONCE_REPORT_TRIES = 3  # with --once, give up writing reports after this many failed tries
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service(Protocol):
    """Something that runs beside the loop (the DICOM node)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


class Engine(Protocol):
    """What the daemon needs from :class:`xrwatch.engine.InferenceEngine`."""

    @property
    def classes(self) -> tuple[str, ...]: ...
    @property
    def spec(self) -> PreprocessSpec: ...

    provider: str
    model_sha256: str

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray: ...


def load_engine(config: ServeConfig) -> Engine:
    """Load the model named in ``config`` (raises ModelError/ProviderError clearly)."""
    from xrwatch.engine import InferenceEngine

    return InferenceEngine(
        config.model,
        use_gpu=config.provider != "cpu",
        require_gpu=config.provider == "cuda",
    )


# -- what a worker returns ---------------------------------------------------------------
@dataclass
class Work:
    """One file through the pipeline; ``kind`` says what the worker concluded."""

    cand: Candidate
    rel: str
    kind: Literal["input", "error", "skip", "requeue", "done"]
    row_id: int = 0
    sha256: str = ""
    array: np.ndarray | None = None
    meta: Any = None
    error: str = ""
    done_state: str = ""  # for kind == "done": the recorded outcome
    delay: float = 0.0  # for kind == "requeue"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


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
        self.counts = {"ok": 0, "error": 0}
        self._truncated_since: dict[str, float] = {}
        self._incomplete_logged: set[str] = set()  # handled on the main loop's thread only
        self._last_tick = time.monotonic()
        self._report_retry_at = 0.0
        self._report_backoff = 1.0
        self._pending_archive: list[tuple[int, Path, str, bool]] = []
        self._batch: list[Work] = []
        self._batch_started: float | None = None
        self._inflight: set[cf.Future[Work]] = set()
        self._watchdog: float | None = None
        self._next_heartbeat = self._next_watchdog = self._next_status = 0.0
        self._next_rescan = 0.0
        self._started = False
        self._hup = threading.Event()
        self._ledger_error: str | None = None  # the last outcome write failed with this
        self._heartbeat_error: str | None = None  # the last ledger heartbeat failed with this
        self._unreported = self._held = 0  # results not in the reports; of which held
        self._report_error: str | None = None  # the last report write failed with this
        self._report_failures = 0  # report writes failed in a row
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.server: MetricsServer | None = None
        # Extensions (xrwatch.dicom): services run beside the loop, started once the watch
        # is live and stopped first at shutdown; finish hooks run inside the ledger
        # transaction that records outcomes.
        self.services: list[Service] = []
        self.finish_hooks: list[FinishHook] = []

    # -- start-up ----------------------------------------------------------------------
    def _check_paths(self) -> None:
        cfg = self.config
        incoming = cfg.incoming.resolve()
        if not incoming.is_dir():
            raise ConfigError(f"{cfg.incoming}: INCOMING folder does not exist or is not a folder")
        for name, path in (
            ("reports", cfg.reports),
            ("state dir", cfg.state_path),
            ("archive", cfg.archive),
        ):
            if path is not None and _inside(path.resolve(), incoming):
                raise ConfigError(
                    f"{path}: the {name} must be outside INCOMING ({cfg.incoming}); "
                    "otherwise the daemon would watch its own output"
                )
        self.incoming = incoming
        if cfg.archive is not None:
            try:
                cfg.archive.mkdir(parents=True, exist_ok=True)
                probe = cfg.archive / f".write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise ReportWriteError(
                    f"{cfg.archive}: archive folder is not writable ({exc.strerror or exc})"
                ) from exc

    def _start(self) -> None:
        cfg = self.config
        self._check_paths()
        if cfg.metrics_port is not None:  # first: a port in use is a start-up error (exit 2)
            self.server = MetricsServer(
                self.metrics, cfg.metrics_host, cfg.metrics_port, self.health
            )
        self.engine = self._engine_factory(cfg)
        self.classes = list(self.engine.classes)
        self.spec = self.engine.spec
        logger.info(
            "model %s: classes %s, input %dx%d, provider %s",
            cfg.model,
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
                "model": str(cfg.model.name),
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
        self._flush_reports()  # reconcile: finish any report append a crash interrupted
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
        return self.ledger.is_finished(rel, st.st_size, st.st_mtime_ns)

    def _close_early(self) -> None:
        """Release what a failed start-up took (the metrics port, the reports share)."""
        if self.server is not None:
            self.server.stop()
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

    # -- the worker: hash, claim, decode -------------------------------------------------
    def _prepare(self, cand: Candidate) -> Work:
        rel = self.watcher.relative(cand.path) or cand.path.name
        if self._stop.is_set():
            return Work(cand, rel, "skip")  # not claimed: the next start picks it up
        try:
            lst = os.lstat(cand.path)
        except OSError:
            return Work(cand, rel, "skip")  # gone
        error = ""
        identity = ""
        sha = ""
        data: bytes | None = None  # read once: hashed for the ledger, then decoded
        if stat.S_ISLNK(lst.st_mode):
            target = Path(os.path.realpath(cand.path))
            link_id = hashlib.sha256(os.fsencode(os.readlink(cand.path))).hexdigest()
            if not _inside(target, self.incoming):
                error = (
                    "symbolic link points outside INCOMING; it was not followed "
                    "(copy the file in instead)"
                )
                identity = f"symlink:{link_id}"
            elif not target.exists():
                error = "symbolic link points to a file that does not exist"
                identity = f"symlink:{link_id}"
        if not error:
            try:
                st = os.stat(cand.path)
            except OSError as exc:
                return Work(cand, rel, "skip", error=str(exc))
            if not stat.S_ISREG(st.st_mode):
                error = f"{_kind_of(st.st_mode)}, not a regular file; only regular files are read"
                identity = f"special:{st.st_mode:o}:{st.st_mtime_ns}"
            else:
                try:
                    sha, data = read_and_hash(cand.path)
                    after = os.lstat(cand.path)  # lstat, as the tracker measured it
                except PermissionError:
                    error = "permission denied: the daemon's user cannot read this file"
                    identity = f"unreadable:{st.st_size}:{st.st_mtime_ns}"
                except FileNotFoundError:
                    return Work(cand, rel, "skip")
                except OSError as exc:
                    error = f"cannot read the file: {exc.strerror or exc}"
                    identity = f"unreadable:{st.st_size}:{st.st_mtime_ns}"
                else:
                    if (after.st_size, after.st_mtime_ns) != (cand.size, cand.mtime_ns):
                        # changed since it was found complete: wait for it again; the bytes
                        # read are all that is hashed and decoded, so nothing later can differ.
                        # (A link is compared as a link: its target is watched on its own.)
                        return Work(cand, rel, "requeue", delay=0.0)
                    identity = sha
        done = self.ledger.finished_row(rel, identity)
        if done is not None:
            return Work(cand, rel, "done", row_id=done[0], done_state=done[1])
        row_id = self.ledger.claim(rel, identity, sha, cand.size, cand.mtime_ns, cand.seen_at)
        if row_id is None:
            return Work(cand, rel, "skip")  # another daemon holds it (or just finished it)

        def failed(reason: str) -> Work:
            # reasons may quote DICOM values: no control characters reach logs or status
            return Work(cand, rel, "error", row_id=row_id, sha256=sha, error=printable(reason))

        if error:
            return failed(error)
        try:
            array, meta = load_model_input(cand.path, self.spec, data=data)
        except TruncatedImageError as exc:
            first = self._truncated_since.setdefault(rel, time.monotonic())
            waited = time.monotonic() - first
            if not self.config.once and waited < self.config.truncated_timeout:
                self.ledger.release(row_id)
                delay = min(max(self.config.stable_seconds, 0.5), 10.0)
                return Work(cand, rel, "requeue", delay=delay, error=printable(exc.reason))
            self._truncated_since.pop(rel, None)
            reason = exc.reason
            if not self.config.once:
                reason += f" (still incomplete after {waited:.0f} s)"
            return failed(reason)
        except ImageError as exc:
            if self._vanished(cand, row_id):
                return Work(cand, rel, "skip")
            return failed(exc.reason)
        except Exception as exc:  # a reader bug must not stop the daemon
            logger.exception("unexpected error reading %s", rel)
            return failed(f"unexpected error while reading: {type(exc).__name__}: {exc}")
        if self._vanished(cand, row_id):
            return Work(cand, rel, "skip")
        self._truncated_since.pop(rel, None)
        return Work(cand, rel, "input", row_id=row_id, sha256=sha, array=array, meta=meta)

    def _vanished(self, cand: Candidate, row_id: int) -> bool:
        """Whether the file was removed while it was decoded (then it is not ours to report)."""
        if os.path.lexists(cand.path):
            return False
        self.ledger.release(row_id)
        return True

    # -- records -----------------------------------------------------------------------
    def _record(self, work: Work, probs: np.ndarray | None) -> dict[str, Any]:
        meta = work.meta
        record: dict[str, Any] = {
            "processed_at": _utc_now(),
            "file": work.rel,
            "sha256": work.sha256,
            "status": "ok" if probs is not None else "error",
            "label": None,
            "confidence": None,
            "probabilities": {},
            "error": work.error or None,
            "model_sha256": self.engine.model_sha256,
            "provider": self.engine.provider,
            **{name: getattr(meta, name, None) for name in DICOM_IDS},
            "kind": getattr(meta, "kind", None),
            "modality": getattr(meta, "modality", None),
            "width": getattr(meta, "width", None),
            "height": getattr(meta, "height", None),
            "detected_at": datetime.fromtimestamp(work.cand.seen_at, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        }
        if probs is not None:
            row = np.asarray(probs, dtype=np.float64).reshape(-1)
            best = int(np.argmax(row))
            record["label"] = self.classes[best]
            record["confidence"] = float(row[best])
            record["probabilities"] = {c: float(p) for c, p in zip(self.classes, row, strict=True)}
        return record

    # -- batches -----------------------------------------------------------------------
    def _infer(self, inputs: list[Work]) -> np.ndarray:
        """Run the engine; on failure log and retry with back-off (the files stay claimed)."""
        backoff = 1.0
        while True:
            try:
                t0 = time.perf_counter()
                arrays = [w.array for w in inputs if w.array is not None]
                probs = self.engine.predict_arrays(np.stack(arrays))
                self.metrics.batch_seconds.observe(time.perf_counter() - t0)
                return probs
            except (ModelError, MemoryError, RuntimeError) as exc:
                if self._stop.is_set() and backoff > RETRY_MAX_SECONDS:
                    raise
                logger.error("inference failed (%s); retrying in %.0f s", exc, backoff)
                self._sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS * 2)

    def _commit(self, batch: list[Work]) -> None:
        """Infer, record outcomes in the ledger, write reports, archive."""
        if not batch:
            return
        inputs = [w for w in batch if w.kind == "input"]
        outcomes: list[tuple[int, str, dict[str, Any]]] = []
        if inputs:
            probs = self._infer(inputs)
            for w, p in zip(inputs, probs, strict=True):
                outcomes.append((w.row_id, "ok", self._record(w, p)))
        for w in batch:
            if w.kind == "error":
                logger.warning("%s: error: %s", w.rel, w.error)
                outcomes.append((w.row_id, "error", self._record(w, None)))
        backoff = 1.0
        while True:
            try:
                self.ledger.finish(outcomes, self.finish_hooks)
                self._ledger_error = None
                break
            except Exception as exc:  # sqlite3.OperationalError: disk full, I/O error
                self._ledger_error = f"cannot record outcomes in the ledger ({exc})"
                logger.error(
                    "cannot record outcomes in the ledger (%s); retrying in %.0f s", exc, backoff
                )
                if self._stop.is_set() and backoff > RETRY_MAX_SECONDS:
                    raise LedgerError(f"cannot record outcomes in the ledger: {exc}") from exc
                self._sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS * 2)
        for _, state, record in outcomes:
            self.counts[state] += 1
            if state == "ok":
                logger.info("%s: %s (%.3f)", record["file"], record["label"], record["confidence"])
        for w in batch:
            if self.config.archive is not None and w.kind in ("input", "error"):
                self._pending_archive.append((w.row_id, w.cand.path, w.rel, w.kind == "input"))
        self._flush_reports()

    def _flush_reports(self) -> None:
        try:
            rows = self.writer.flush(
                self.ledger, hold_seconds=HELD_RETRY_SECONDS, progress=self._progress
            )
        except (ReportWriteError, sqlite3.Error) as exc:
            logger.error("reports not written, will retry: %s", exc)
            self._report_error = str(exc)
            self._report_failures += 1
            self.metrics.report_write_failures.inc()
            self._report_retry_at = time.monotonic() + self._report_backoff
            self._report_backoff = min(self._report_backoff * 2, RETRY_MAX_SECONDS)
            self._count_unreported()
            return
        self._report_error = None
        self._report_failures = 0
        self._report_retry_at = 0.0
        self._report_backoff = 1.0
        self._count_unreported()
        now = time.time()
        for row in rows:
            self.metrics.files.labels(row.state).inc()
            detected = row.record.get("detected_at")
            if detected:
                seen = datetime.fromisoformat(str(detected).replace("Z", "+00:00")).timestamp()
                self.metrics.latency.observe(max(0.0, now - seen))
        self._archive_pending()

    def _archive_pending(self) -> None:
        if self.config.archive is None or self._report_retry_at:
            return  # archive only once the report rows are on disk
        pending, self._pending_archive = self._pending_archive, []
        for row_id, path, rel, ok in pending:
            try:
                dest = move_to_archive(path, self.config.archive, rel, ok)
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.error("%s: cannot move to the archive (%s); will retry", rel, exc)
                self.tracker.offer(path, delay=self.config.rescan_interval)
                continue
            logger.info("%s: moved to %s", rel, dest)
            try:
                self.ledger.set_archived(row_id, str(dest))
            except sqlite3.Error as exc:  # only bookkeeping: the move itself is done
                logger.error("%s: cannot record the archive path: %s", rel, exc)

    def _count_unreported(self) -> None:
        try:
            unreported, held = self.ledger.unreported_counts()
        except sqlite3.Error:
            return
        self._unreported, self._held = unreported, held
        self.metrics.unreported.set(unreported)

    # -- health --------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """What ``/healthz`` answers: (healthy, reason)."""
        return health_check(
            lambda: self._last_tick,
            lambda: self.config.once or not self._started or self.watcher.alive(),
            stale_after=LOOP_STALE_SECONDS,
            problems=self._problems,
            notes=self._notes,
        )()

    def _problems(self) -> list[str]:
        found = []
        if self._report_error is not None:
            found.append(
                f"results cannot be written to the reports ({self._report_error}); "
                f"{self._unreported} result(s) held back"
            )
        for error in (self._ledger_error, self._heartbeat_error):
            if error is not None:
                found.append(error)
        return found

    def _notes(self) -> list[str]:
        held = self._held
        if not held:
            return []
        return [
            f"{held} result(s) held back: their report could not be written "
            "(see xrwatch status); the other files go on"
        ]

    # -- the loop ----------------------------------------------------------------------
    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.2))
            self._progress()

    def _progress(self) -> None:
        """The main thread is working (the heartbeat thread pings while this is recent)."""
        self._last_tick = time.monotonic()

    def _tick_heartbeats(self) -> None:
        self._progress()
        self.metrics.last_tick.set(time.time())

    def _beat_loop(self) -> None:
        """The heartbeat thread: watchdog pings, ledger heartbeat and STATUS= on time."""
        tick = min(0.5, self._watchdog / 2) if self._watchdog is not None else 0.5
        while not self._beat_stop.wait(tick):
            self._beat()

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self._last_tick > LOOP_STALE_SECONDS:
            return  # the main loop is stuck: let systemd's watchdog see it
        if now >= self._next_heartbeat:
            try:
                self.ledger.heartbeat()
                self._heartbeat_error = None
            except Exception as exc:
                logger.error("ledger heartbeat failed: %s", exc)
                self._heartbeat_error = f"cannot write the ledger heartbeat ({exc})"
            self._next_heartbeat = now + HEARTBEAT_SECONDS
        if not self.ready.is_set():
            return  # systemd hears from us from READY=1 on
        if self._watchdog is not None and now >= self._next_watchdog:
            sdnotify.notify("WATCHDOG=1")
            self._next_watchdog = now + self._watchdog
        if now >= self._next_status:
            sdnotify.notify(f"STATUS={self.status_line()}")
            self._next_status = now + STATUS_SECONDS

    def status_line(self) -> str:
        held = self._unreported if self._report_error else self._held
        return (
            f"{self.counts['ok']} ok, {self.counts['error']} errors since start; "
            f"{self._queue_depth()} waiting; provider {self.engine.provider}"
            + (f"; {held} result(s) not written to the reports" if held else "")
        )

    def _queue_depth(self) -> int:
        return (
            len(self.tracker)
            + len(getattr(self, "_inflight", ()))
            + len(getattr(self, "_batch", ()))
        )

    def _handle(self, work: Work) -> None:
        if work.kind in ("input", "error"):
            self._incomplete_logged.discard(work.rel)
            self._batch.append(work)
            if self._batch_started is None:
                self._batch_started = time.monotonic()
        elif work.kind == "requeue":
            if work.error and work.rel not in self._incomplete_logged:
                # once at INFO; the retries every few seconds only at DEBUG
                self._incomplete_logged.add(work.rel)
                logger.info("%s: incomplete (%s); waiting for the rest", work.rel, work.error)
            elif work.error:
                logger.debug("%s: still incomplete (%s)", work.rel, work.error)
            self.tracker.offer(work.cand.path, delay=work.delay, seen_at=work.cand.seen_at)
        elif work.kind == "done" and self.config.archive is not None:
            logger.info("%s: already processed (%s); archiving", work.rel, work.done_state)
            self._pending_archive.append(
                (work.row_id, work.cand.path, work.rel, work.done_state == "ok")
            )
            self._archive_pending()

    def run(self) -> int:
        """Start, serve until stopped (or, with ``once``, until the backlog is done)."""
        cfg = self.config
        try:
            self._start()
        except BaseException:
            self._close_early()
            raise
        self._started = True
        self._watchdog = sdnotify.watchdog_interval()
        now = time.monotonic()
        self._last_tick = now
        self._next_heartbeat = self._next_watchdog = self._next_status = now
        self._next_rescan = now + cfg.rescan_interval
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._on_signal) for sig in _HANDLED_SIGNALS}
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
        self._beat_thread = threading.Thread(
            target=self._beat_loop, name="xrwatch-heartbeat", daemon=True
        )
        self._beat_thread.start()
        pool = cf.ThreadPoolExecutor(cfg.workers, thread_name_prefix="xrwatch-decode")
        try:
            if self.server is not None:
                self.server.start()
            if not cfg.once:
                self.watcher.start()
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
                self.watcher.stop()
                if self.server is not None:
                    self.server.stop()
                self._beat_stop.set()
                self._beat_thread.join()
                sdnotify.notify(f"STATUS=stopped: {self.status_line()}")
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                try:
                    self.ledger.unregister()
                except Exception as exc:
                    logger.error("cannot unregister from the ledger: %s", exc)
                self._count_unreported()
                self.ledger.close()
                self.writer.release()
        logger.info("stopped: %s", self.status_line())
        if self._unreported:
            logger.error(
                "%d result(s) are recorded in the ledger but not in %s (their report could not "
                "be written); they are written at the next start",
                self._unreported,
                cfg.reports,
            )
        if cfg.once and (self.counts["error"] or self._unreported):
            return EXIT_SOME_FAILED
        return EXIT_OK

    def _loop(self, pool: cf.ThreadPoolExecutor) -> None:
        cfg = self.config
        max_inflight = cfg.workers * 2 + cfg.batch_size
        while not self._stop.is_set():
            self._wake.clear()
            self._tick_heartbeats()  # every pass, also when full batches keep coming
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
                    fut = pool.submit(self._prepare, cand)
                    fut.add_done_callback(lambda _f: self._wake.set())
                    self._inflight.add(fut)
            now = time.monotonic()
            if self._batch and (
                len([w for w in self._batch if w.kind == "input"]) >= cfg.batch_size
                or now - (self._batch_started or now) >= cfg.max_wait
            ):
                batch, self._batch, self._batch_started = self._batch, [], None
                self._commit(batch)
                continue
            if self._report_retry_at and now >= self._report_retry_at:
                self._flush_reports()
            if now >= self._next_rescan:
                if not cfg.once:
                    self.watcher.ensure_alive()
                self.watcher.scan()
                if not self._report_retry_at:
                    self._flush_reports()  # held rows that are due again
                self._next_rescan = now + cfg.rescan_interval
            self.metrics.queue_depth.set(self._queue_depth())
            if cfg.once and not self._inflight and not self._batch and not len(self.tracker):
                if self._report_retry_at and self._report_failures < ONCE_REPORT_TRIES:
                    self._wake.wait(0.2)
                    continue
                break
            timeout = 0.05 if len(self.tracker) else 0.5
            if self._batch_started is not None:
                timeout = min(timeout, max(0.0, self._batch_started + cfg.max_wait - now))
            self._wake.wait(timeout)

    def _collect(self) -> None:
        for fut in [f for f in self._inflight if f.done()]:
            self._inflight.discard(fut)
            try:
                work = fut.result()
            except Exception:  # _prepare catches file errors; this is a bug or the ledger
                logger.exception("worker failed; the file will be retried on the next rescan")
                continue
            self._handle(work)

    def _drain(self) -> None:
        """Finish what is in flight: decodes already claimed, then the last batches."""
        if not self._started:
            return
        if self._inflight:
            logger.info("finishing %d file(s) in flight", len(self._inflight))
        cf.wait(self._inflight)
        self._collect()
        while self._batch:
            batch, self._batch = (
                self._batch[: self.config.batch_size],
                self._batch[self.config.batch_size :],
            )
            try:
                self._commit(batch)
            except XRWatchError as exc:
                logger.error("giving up on %d file(s) at shutdown: %s", len(batch), exc)
        if self._report_retry_at:
            self._flush_reports()


def serve(config: ServeConfig) -> int:
    """Run the daemon with ``config``; return the exit status."""
    return Daemon(config).run()
