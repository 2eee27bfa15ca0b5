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
import errno
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
from typing import TYPE_CHECKING, Any, Literal, Protocol

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
from xrwatch.imageio.detect import HEAD_BYTES, JPEG_SIGNATURE, PNG_SIGNATURE
from xrwatch.preprocess import PreprocessSpec, load_model_input
from xrwatch.safetext import printable
from xrwatch.serve import sdnotify
from xrwatch.serve.archive import move_to_archive
from xrwatch.serve.config import ServeConfig
from xrwatch.serve.ledger import FinishHook, Ledger, LedgerError
from xrwatch.serve.metrics import Metrics, MetricsServer, health_check
from xrwatch.serve.names import escape_name
from xrwatch.serve.reports import ReportWriter
from xrwatch.serve.safefs import FileId, InputTooLarge, open_dir, open_file, read_fd
from xrwatch.serve.stability import Candidate, StabilityTracker, signature
from xrwatch.serve.watcher import MAX_DEPTH, FolderWatcher, depth

if TYPE_CHECKING:
    from xrwatch.heatmap import HeatmapJob, HeatmapWriter

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
HEATMAPS_DIR = "heatmaps"  # REPORTS/heatmaps/<relative path>.png


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
        low_confidence=config.low_confidence,
        scope_guard=config.scope_guard,
    )


@dataclass(frozen=True)
class _Probabilities:
    """Outputs of an engine that has only ``predict_arrays`` (no cam, no guard)."""

    probabilities: np.ndarray


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
    parts: tuple[str, ...] = ()  # the path below INCOMING, as the OS names it
    fid: FileId | None = None  # the inode at the name when it was read: the one to archive
    refresh: dict[str, Any] | None = None  # kind == "done": rewrite the JSON with this record


class _Skip(Exception):
    """Not ours to report now: gone, moved away, or the daemon is stopping."""


class _Requeue(Exception):
    """Changed while it was looked at: wait for it to be complete again."""


@dataclass
class _Read:
    """What reading a file gave: its bytes, or why not (``error``), and its identity."""

    identity: str
    error: str = ""
    sha256: str = ""
    data: bytes | None = None


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


# the signature, the IHDR chunk (the size) and the next chunk's length and type: shorter,
# Pillow cannot tell a PNG still being written from a broken one
PNG_HEAD_BYTES = len(PNG_SIGNATURE) + 25 + 8


def too_short_to_identify(data: bytes) -> bool:
    """Whether ``data`` may be the start of an image still being written: empty, zeros
    only up to the DICOM marker (a preamble), or a PNG/JPEG shorter than its header. Such
    a file is waited for like a truncated one, instead of being an error at once."""
    if len(data) < HEAD_BYTES and not data.strip(b"\0"):
        return True
    if PNG_SIGNATURE.startswith(data[:8]) and len(data) < PNG_HEAD_BYTES:
        return True
    return JPEG_SIGNATURE.startswith(data[:3]) and len(data) < HEAD_BYTES


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


@dataclass
class _Begun:
    """A batch inferred, with its outcomes, whose heatmaps are being written."""

    batch: list[Work]
    outcomes: list[tuple[int, str, dict[str, Any]]]
    heatmaps: list[tuple[dict[str, Any], HeatmapJob]]
    written: cf.Future[list[Path | None]] | None  # the heatmaps' paths, once written

    def ready(self) -> bool:
        return self.written is None or self.written.done()


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
        self._pending_archive: list[tuple[Work, bool]] = []  # (work, ok)
        self._batch: list[Work] = []
        self._batch_started: float | None = None
        # inferred, heatmaps being written, not yet recorded; oldest first, at most two
        self._begun: list[_Begun] = []
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
        # a batch's heatmaps are written in parallel; its threads start with the first batch
        self._heatmaps: HeatmapWriter | None = None
        if config.heatmaps:
            from xrwatch.heatmap import HeatmapWriter

            self._heatmaps = HeatmapWriter()

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
        meta = getattr(self.engine, "meta", None)  # a test's stand-in engine may have none
        # every report row names the model: <arch>-<experiment>-<precision> (file name)
        self.model_name = f"{meta.name} ({cfg.model.name})" if meta else cfg.model.name
        logger.info(
            "model %s (%s): classes %s, input %dx%d, provider %s",
            cfg.model,
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
        return self.ledger.is_finished(escape_name(rel), *signature(st))

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

    # -- the worker: read, hash, claim, decode ------------------------------------------
    def _prepare(self, cand: Candidate) -> Work:
        raw = self.watcher.relative(cand.path) or cand.path.name
        rel = escape_name(raw)  # the name in the ledger, reports and logs
        if self._stop.is_set():
            return Work(cand, rel, "skip")  # not claimed: the next start picks it up
        parts = tuple(raw.split("/"))
        try:
            dir_fd = open_dir(self.incoming, parts[:-1])
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                logger.warning(
                    "%s: a folder on its path is now a symbolic link (or not a folder); "
                    "it is not followed",
                    rel,
                )
            return Work(cand, rel, "skip")  # the file that was found there is gone
        try:
            return self._prepare_at(cand, rel, parts, dir_fd)
        except _Skip:
            return Work(cand, rel, "skip")
        except _Requeue:
            return Work(cand, rel, "requeue", delay=0.0)
        finally:
            os.close(dir_fd)

    def _prepare_at(self, cand: Candidate, rel: str, parts: tuple[str, ...], dir_fd: int) -> Work:
        name = parts[-1]
        try:
            lst = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            raise _Skip from None  # gone
        if signature(lst) != (cand.size, cand.mtime_ns, cand.ctime_ns, cand.ino):
            raise _Requeue  # changed since it was found complete
        fid: FileId | None = FileId.of(lst)  # what an archive move must find at the name
        if stat.S_ISDIR(lst.st_mode):
            if depth("/".join(parts)) <= MAX_DEPTH:
                raise _Skip  # a file replaced by a folder: its files are found on their own
            fid = None  # a folder is reported, never archived
            got = _Read(
                "too-deep",
                f"a folder nested more than {MAX_DEPTH} levels below INCOMING; "
                "its files are not read (move them nearer to INCOMING)",
            )
        elif stat.S_ISLNK(lst.st_mode):
            got = self._read_link(dir_fd, parts)
        else:
            got = self._read_leaf(dir_fd, name, lst)
        done = self.ledger.finished_row(rel, got.identity)
        if done is not None:
            refresh = self.ledger.seen_again(done[0], *signature(lst))
            return Work(
                cand, rel, "done", row_id=done[0], done_state=done[1], parts=parts, fid=fid,
                refresh=refresh,
            )  # fmt: skip
        row_id = self.ledger.claim(
            rel, got.identity, got.sha256, cand.size, cand.mtime_ns, cand.seen_at,
            cand.ctime_ns, cand.ino,
        )  # fmt: skip
        if row_id is None:
            return Work(cand, rel, "skip")  # another daemon holds it (or just finished it)

        def failed(reason: str) -> Work:
            # reasons may quote DICOM values: no control characters reach logs or status
            return Work(
                cand, rel, "error", row_id=row_id, sha256=got.sha256, error=printable(reason),
                parts=parts, fid=fid,
            )  # fmt: skip

        if got.error or got.data is None:
            return failed(got.error)
        data = got.data
        try:
            array, meta = load_model_input(cand.path, self.spec, data=data)
        except ImageError as exc:
            # Too short to tell what it is (an empty file, a DICOM preamble, a bare PNG
            # signature) is as incomplete as a truncated one: wait for the rest.
            short = too_short_to_identify(data)
            if not isinstance(exc, TruncatedImageError) and not short:
                if self._vanished(dir_fd, name, row_id):
                    raise _Skip from None
                return failed(exc.reason)
            first = self._truncated_since.setdefault(rel, time.monotonic())
            waited = time.monotonic() - first
            if not self.config.once and waited < self.config.truncated_timeout:
                self.ledger.release(row_id)
                delay = min(max(self.config.stable_seconds, 0.5), 10.0)
                why = exc.reason if not short else f"only {len(data)} bytes so far"
                return Work(cand, rel, "requeue", delay=delay, error=printable(why))
            self._truncated_since.pop(rel, None)
            reason = exc.reason
            if not self.config.once:
                reason += f" (still incomplete after {waited:.0f} s)"
            return failed(reason)
        except Exception as exc:  # a reader bug must not stop the daemon
            logger.exception("unexpected error reading %s", rel)
            return failed(f"unexpected error while reading: {type(exc).__name__}: {exc}")
        if self._vanished(dir_fd, name, row_id):
            raise _Skip
        self._truncated_since.pop(rel, None)
        return Work(
            cand, rel, "input", row_id=row_id, sha256=got.sha256, array=array, meta=meta,
            parts=parts, fid=fid,
        )  # fmt: skip

    def _read_link(self, dir_fd: int, parts: tuple[str, ...]) -> _Read:
        """A symbolic link is read only when it leads to a file inside INCOMING, and that
        file is then reached from INCOMING without following links, like any other."""
        try:
            link = os.readlink(parts[-1], dir_fd=dir_fd)
        except OSError:
            raise _Skip from None
        ident = f"symlink:{hashlib.sha256(os.fsencode(link)).hexdigest()}"
        target = Path(os.path.realpath(self.incoming.joinpath(*parts[:-1], link)))
        if not _inside(target, self.incoming):
            return _Read(
                ident,
                "symbolic link points outside INCOMING; it was not followed "
                "(copy the file in instead)",
            )
        tparts = target.relative_to(self.incoming).parts
        if not tparts:
            return _Read(ident, "symbolic link points to INCOMING itself, not to a file")
        try:
            tdir = open_dir(self.incoming, tparts[:-1])
            try:
                tst = os.stat(tparts[-1], dir_fd=tdir, follow_symlinks=False)
                return self._read_leaf(tdir, tparts[-1], tst)
            finally:
                os.close(tdir)
        except FileNotFoundError:
            return _Read(ident, "symbolic link points to a file that does not exist")
        except OSError:
            raise _Requeue from None  # its target changed while it was followed

    def _read_leaf(self, dir_fd: int, name: str, lst: os.stat_result) -> _Read:
        """Read the file ``name`` of ``dir_fd`` (found with ``lst``) once, bounded."""
        limit = self.config.max_file_mb << 20
        try:
            fd = open_file(dir_fd, name)
        except FileNotFoundError:
            raise _Skip from None
        except PermissionError:
            return _Read(
                f"unreadable:{lst.st_size}:{lst.st_mtime_ns}",
                "permission denied: the daemon's user cannot read this file",
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Requeue from None  # became a link after it was looked at
            return _Read(
                f"unreadable:{lst.st_size}:{lst.st_mtime_ns}",
                f"cannot read the file: {exc.strerror or exc}",
            )
        try:
            st = os.fstat(fd)
            if not FileId.of(st).same_inode(lst):
                raise _Requeue
            if not stat.S_ISREG(st.st_mode):
                return _Read(
                    f"special:{st.st_mode:o}:{st.st_mtime_ns}",
                    f"{_kind_of(st.st_mode)}, not a regular file; only regular files are read",
                )
            too_large = _Read(
                f"too-large:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}",
                f"file is {st.st_size} bytes, over the {self.config.max_file_mb} MiB limit "
                "(max_file_mb); it was not read",
            )
            if st.st_size > limit:
                return too_large
            try:
                got = read_fd(fd, limit, stop=self._stop.is_set)
            except InputTooLarge:
                raise _Requeue from None  # still growing
            except OSError as exc:
                return _Read(
                    f"unreadable:{st.st_size}:{st.st_mtime_ns}",
                    f"cannot read the file: {exc.strerror or exc}",
                )
            if got is None:
                raise _Skip  # stopping: not claimed, the next start reads it
            data, after = got
            if FileId.of(after) != FileId.of(st) or len(data) != after.st_size:
                # changed while it was read: wait for it again; the bytes read are all that
                # is hashed and decoded, so nothing later can differ
                raise _Requeue
            sha = hashlib.sha256(data).hexdigest()
            return _Read(sha, sha256=sha, data=data)
        finally:
            os.close(fd)

    def _vanished(self, dir_fd: int, name: str, row_id: int) -> bool:
        """Whether the file was removed while it was decoded (then it is not ours to report)."""
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            self.ledger.release(row_id)
            return True
        except OSError:
            pass
        return False

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
            "model": self.model_name,
            "model_sha256": self.engine.model_sha256,
            "provider": self.engine.provider,
            **{name: getattr(meta, name, None) for name in DICOM_IDS},
            "kind": getattr(meta, "kind", None),
            "modality": getattr(meta, "modality", None),
            "width": getattr(meta, "width", None),
            "height": getattr(meta, "height", None),
            "flag": "",
            "flag_reason": None,
            "ood_score": None,
            "heatmap": None,  # relative to REPORTS
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

    def _explain(self, record: dict[str, Any], work: Work, out: Any, i: int) -> HeatmapJob | None:
        """Add the flag of one ok result; return its heatmap to write, when enabled."""
        flag = getattr(self.engine, "flag", None)
        ood = getattr(out, "ood_score", None)
        contrast = getattr(out, "contrast", None)
        record["ood_score"] = float(ood[i]) if ood is not None else None
        if flag is not None:
            record["flag"], reason = flag(
                record["confidence"],
                ood_score=record["ood_score"],
                contrast=float(contrast[i]) if contrast is not None else None,
                meta=work.meta,
            )
            record["flag_reason"] = reason or None
        cam = getattr(out, "cam", None)
        if self._heatmaps is None or cam is None or work.array is None:
            return None
        from xrwatch.heatmap import HeatmapJob

        best = self.classes.index(record["label"])
        return HeatmapJob(
            root=self.config.reports / HEATMAPS_DIR,
            rel=work.rel,
            pixels=np.asarray(work.array).reshape(self.spec.size, self.spec.size),
            cam=cam[i][best],
            label=record["label"],
            confidence=record["confidence"],
        )

    # -- batches -----------------------------------------------------------------------
    def _infer(self, inputs: list[Work]) -> Any:
        """Run the engine; on failure log and retry with back-off (the files stay claimed).

        Returns the engine's ``BatchOutputs`` (probabilities, cam, guard scores), or for an
        engine without ``predict_outputs`` an object with just ``probabilities``.
        """
        backoff = 1.0
        predict = getattr(self.engine, "predict_outputs", None)
        while True:
            try:
                t0 = time.perf_counter()
                arrays = np.stack([w.array for w in inputs if w.array is not None])
                if predict is not None:
                    out = predict(arrays)
                else:
                    out = _Probabilities(self.engine.predict_arrays(arrays))
                self.metrics.batch_seconds.observe(time.perf_counter() - t0)
                return out
            except (ModelError, MemoryError, RuntimeError) as exc:
                if self._stop.is_set() and backoff > RETRY_MAX_SECONDS:
                    raise
                logger.error("inference failed (%s); retrying in %.0f s", exc, backoff)
                self._finish_begun()  # what was inferred before is recorded meanwhile
                self._sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS * 2)

    def _begin(self, batch: list[Work]) -> _Begun:
        """Infer a batch and build its outcomes; its heatmaps start being written in the
        background (:meth:`HeatmapWriter.submit_many`), so the loop can infer the next
        batch meanwhile. Nothing is recorded until :meth:`_finish`."""
        inputs = [w for w in batch if w.kind == "input"]
        outcomes: list[tuple[int, str, dict[str, Any]]] = []
        heatmaps: list[tuple[dict[str, Any], HeatmapJob]] = []
        if inputs:
            out = self._infer(inputs)
            for i, w in enumerate(inputs):
                record = self._record(w, out.probabilities[i])
                job = self._explain(record, w, out, i)
                if job is not None:
                    heatmaps.append((record, job))
                outcomes.append((w.row_id, "ok", record))
        written = None
        if heatmaps and self._heatmaps is not None:
            written = self._heatmaps.submit_many([job for _, job in heatmaps])
            written.add_done_callback(lambda _f: self._wake.set())
        for w in batch:
            if w.kind == "error":
                logger.warning("%s: error: %s", w.rel, w.error)
                outcomes.append((w.row_id, "error", self._record(w, None)))
        return _Begun(batch, outcomes, heatmaps, written)

    def _commit(self, batch: list[Work]) -> None:
        """Infer, record outcomes in the ledger, write reports, archive: all before it
        returns (``_drain``, once no batch is begun; the loop instead overlaps a batch's
        heatmaps with the next inference)."""
        self._finish(self._begin(batch))

    def _finish_begun(self, keep: int = 0) -> None:
        """Finish begun batches, oldest first, until ``keep`` are left. One that cannot be
        finished (its exception is raised) stays first in line: none after it is recorded
        before it, and :meth:`_drain` tries it again."""
        while len(self._begun) > keep:
            self._finish(self._begun[0])
            self._begun.pop(0)

    def _finish(self, begun: _Begun) -> None:
        """Record a begun batch: once its heatmaps are written (or failed: logged, the
        record keeps ``None``), the ledger, then the reports and the archive."""
        batch, outcomes = begun.batch, begun.outcomes
        if begun.written is not None:
            paths = begun.written.result()  # every heatmap written (or failed) before the ledger
            for (record, _), path in zip(begun.heatmaps, paths, strict=True):
                if path is not None:
                    record["heatmap"] = path.relative_to(self.config.reports).as_posix()
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
                self._pending_archive.append((w, w.kind == "input"))
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
            if row.record.get("flag"):
                self.metrics.flagged.labels(row.record["flag"]).inc()
            detected = row.record.get("detected_at")
            if detected:
                seen = datetime.fromisoformat(str(detected).replace("Z", "+00:00")).timestamp()
                self.metrics.latency.observe(max(0.0, now - seen))
        self._archive_pending()

    def _archive_pending(self) -> None:
        if self.config.archive is None or self._report_retry_at:
            return  # archive only once the report rows are on disk
        pending, self._pending_archive = self._pending_archive, []
        for work, ok in pending:
            rel, path = work.rel, work.cand.path
            if work.fid is None:
                continue  # a folder: reported, left where it is
            try:
                dest = move_to_archive(
                    self.incoming, work.parts, work.fid, self.config.archive, rel, ok
                )
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    logger.warning(
                        "%s: not archived: a folder on its path is now a symbolic link", rel
                    )
                    continue
                logger.error("%s: cannot move to the archive (%s); will retry", rel, exc)
                self.tracker.offer(path, delay=self.config.rescan_interval)
                continue
            if dest is None:
                logger.warning(
                    "%s: not archived: the name now holds another file than the one "
                    "classified; that one is processed on its own",
                    rel,
                )
                self.tracker.offer(path)
                continue
            logger.info("%s: moved to %s", rel, dest)
            try:
                self.ledger.set_archived(work.row_id, str(dest))
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
        errors = self.counts["error"]
        return (
            f"{self.counts['ok']} ok, {errors} error{'' if errors == 1 else 's'} since start; "
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
        elif work.kind == "done":
            if work.refresh is not None:
                # A, then B, then A again under one name: the JSON describes A again
                try:
                    self.writer.refresh_json(work.rel, work.refresh)
                except ReportWriteError as exc:
                    logger.error("%s: %s", work.rel, exc)
            if self.config.archive is not None:
                logger.info("%s: already processed (%s); archiving", work.rel, work.done_state)
                self._pending_archive.append((work, work.done_state == "ok"))
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
                if self._heatmaps is not None:
                    self._heatmaps.close()
                self.watcher.stop()
                if self.server is not None:
                    self.server.stop()
                self._beat_stop.set()
                self._beat_thread.join()
                sdnotify.notify(f"STATUS=stopped: {self.status_line()}")
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                threading.excepthook = previous_hook
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
                # inferred while the batch before's heatmaps are written; then that one is
                # recorded (its heatmaps have had this inference's time)
                self._begun.append(self._begin(batch))
                self._finish_begun(keep=1)
                continue
            if self._begun and self._begun[0].ready():
                self._finish_begun()
            if self._report_retry_at and now >= self._report_retry_at:
                self._flush_reports()
            if now >= self._next_rescan:
                try:
                    if not cfg.once:
                        self.watcher.ensure_alive()
                    self.watcher.scan()
                except Exception:  # no scan may end the loop
                    logger.exception("rescan of %s failed; trying again later", cfg.incoming)
                if not self._report_retry_at:
                    self._flush_reports()  # held rows that are due again
                self._next_rescan = now + cfg.rescan_interval
            self.metrics.queue_depth.set(self._queue_depth())
            if (
                cfg.once
                and not self._inflight
                and not self._batch
                and not self._begun
                and not len(self.tracker)
            ):
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

    @staticmethod
    def _or_give_up(record: Callable[[Any], None], batch: Any, files: int) -> None:
        """At shutdown: ``record(batch)``; if it fails, log why and give it up (its files
        stay claimed and are taken again at the next start), so the batches after it go on."""
        try:
            record(batch)
        except XRWatchError as exc:
            logger.error("giving up on %d file(s) at shutdown: %s", files, exc)
        except Exception:  # a bug; the batches after it are still recorded
            logger.exception("giving up on %d file(s) at shutdown", files)

    def _drain(self) -> None:
        """Finish what is in flight: decodes already claimed, then the last batches."""
        if not self._started:
            return
        if self._inflight:
            logger.info("finishing %d file(s) in flight", len(self._inflight))
        cf.wait(self._inflight)
        self._collect()
        while self._begun:  # oldest first; one that fails is given up, the others go on
            begun = self._begun.pop(0)
            self._or_give_up(self._finish, begun, len(begun.batch))
        while self._batch:
            batch, self._batch = (
                self._batch[: self.config.batch_size],
                self._batch[self.config.batch_size :],
            )
            self._or_give_up(self._commit, batch, len(batch))
        if self._report_retry_at:
            self._flush_reports()


def serve(config: ServeConfig) -> int:
    """Run the daemon with ``config``; return the exit status."""
    return Daemon(config).run()
