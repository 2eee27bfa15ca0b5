"""Where the intake's decodes run: in the worker thread itself, or in a process of its own.

Decoding holds the interpreter lock: Pillow's and pylibjpeg's JPEG 2000 decoders for the
whole decode (a 206 ms frame), pylibjpeg's JPEG decoder for most of it
(``benchmarks/decoder_gil.py``). In a daemon with a DICOM port that lock is what
pynetdicom's reception needs for every PDU: sampled during a C-STORE burst
(``benchmarks/dicom_receive.py --gil-profile``) the two decode threads held it in 56 % of
the samples, and 200 instances took 9-11 s to be acknowledged instead of the idle
daemon's 4 s.

:class:`Decoders` therefore runs each decode thread's decodes in a worker process of that
thread's own (``decode_in = "processes"``; ``"auto"``, the default, means processes with a
DICOM port and threads without, where a process start, about a second for the fork
server's imports, would buy nothing). The file's bytes go to the worker (the very bytes the
intake read and hashed), the model input and the :class:`ImageMeta` come back, with the log
records the decode wrote, which are logged here, in the daemon's format. A worker is started
in the background (:func:`xrwatch.forkworkers.launch`); until it runs, its thread decodes
itself, so no file waits for a process start.

The workers run at niceness 5: behind the daemon's own threads, which acknowledge C-STOREs
and run the model and need little CPU each, and ahead of the SR builder (niceness 10).
On 2 cores a burst of 200 C-STOREs reached the last report at 0.71-0.82 of the folder's
rate (three runs), against 0.62 decoding in threads, and was acknowledged 3-4 s sooner
(``benchmarks/dicom_receive.py``, docs/benchmarks.md).

One worker per thread, one decode at a time: a worker that ends mid-decode (a decoder that
crashes on a malformed file, the OOM killer) fails that file alone. It is tried once more in
a new worker; a second ending makes it an error row naming the file and why (nothing is
lost, the file is archived as failed like any unreadable one). A worker found dead before a
decode (between files) is replaced without counting against the file. An error the worker
cannot send back as it is comes back as an :class:`ImageDecodeError` with its type and
message, its traceback logged.

Memory: each worker decodes one file at a time, so the decode budget
(:mod:`xrwatch.imageio.budget`) does not bound them together as it bounds threads: at
worst the decodes hold ``workers`` times the largest image (a 100 MP image, the pixel limit:
954 MiB estimated each). Each worker also holds the file it decodes and its libraries
(``benchmarks/decode.py --worker-memory``: 69-78 MiB resident, 43-52 MiB proportional to
the pages it shares with the fork server, in three runs); ``deploy/README.md`` sizes
``MemoryMax`` for it.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import pickle
import threading
import traceback
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xrwatch import forkworkers
from xrwatch.errors import ImageDecodeError
from xrwatch.preprocess import PreprocessSpec, load_model_input
from xrwatch.serve.config import DecodeIn

if TYPE_CHECKING:
    from xrwatch.imageio.types import ImageMeta

logger = logging.getLogger(__name__)

# the workers' niceness: behind the daemon's threads (a C-STORE waits on them, and they
# need little CPU), ahead of the SR builder (10), which works on results already reported
NICENESS = 5
START_TIMEOUT = 120.0  # seconds a new worker may take to run (the fork server's imports)
CRASHED = (
    "the decoder process ended while decoding this file, twice (a decoder crash on malformed "
    "data, or the process was killed); the file was not decoded"
)
NO_WORKER = (
    "the decoder process ended while decoding this file and no new one could be started; "
    "the file was not decoded"
)


@dataclass
class _Decoded:
    """What a worker sends back: the result or the exception, and the log records."""

    result: tuple[np.ndarray, ImageMeta] | None = None
    error: BaseException | None = None
    records: list[tuple[str, int, str]] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.name, record.levelno, record.getMessage()))
        except Exception:  # a malformed record must not fail the decode
            self.records.append((record.name, record.levelno, str(record.msg)))


def _sendable(exc: Exception, path: str, records: list[tuple[str, int, str]]) -> Exception:
    """``exc`` if it survives pickling as it is (ImageError does, with path and reason);
    else an ImageDecodeError with its type and message, the traceback in ``records``."""
    try:
        back = pickle.loads(pickle.dumps(exc))
        if type(back) is type(exc) and str(back) == str(exc):
            return exc
    except Exception:
        pass
    trace = "".join(traceback.format_exception(exc)).rstrip()
    records.append((__name__, logging.ERROR, f"{path}: in the decoder process: {trace}"))
    return ImageDecodeError(path, f"unexpected error while decoding: {type(exc).__name__}: {exc}")


def decode_in_worker(path: str, spec: PreprocessSpec, data: bytes, level: int) -> _Decoded:
    """In a worker: :func:`load_model_input` of ``data``, with the records logged at
    ``level`` or above (the daemon's level, Python warnings included) collected for the
    daemon to log."""
    root = logging.getLogger()
    collect = _Collect(level)
    root.addHandler(collect)
    root.setLevel(level)
    logging.captureWarnings(True)
    try:
        return _Decoded(result=load_model_input(path, spec, data=data), records=collect.records)
    except Exception as exc:  # sent back whole when it pickles (ImageError does)
        return _Decoded(error=_sendable(exc, path, collect.records), records=collect.records)
    finally:
        root.removeHandler(collect)


@dataclass
class _Worker:
    pool: cf.ProcessPoolExecutor
    started: cf.Future[int]  # the worker's pid once it runs


class Decoders:
    """The daemon's decodes (see the module's docstring); called by the decode threads."""

    def __init__(
        self,
        spec: PreprocessSpec,
        decode_in: DecodeIn,
        dicom_port: bool,
        work: Callable[[str, PreprocessSpec, bytes, int], _Decoded] = decode_in_worker,
    ) -> None:
        self.spec = spec
        self._work = work  # what a worker runs (tests pass one that can end its process)
        self.processes = decode_in == "processes" or (decode_in == "auto" and dicom_port)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = not self.processes

    def decode(self, path: Path, data: bytes) -> tuple[np.ndarray, ImageMeta]:
        """The model input and meta of ``data`` (the bytes of ``path``). Raises
        :class:`xrwatch.errors.ImageError` for a file that does not decode."""
        worker = self._worker()
        if worker is None or not worker.started.done():
            return self._here(path, data)
        ended = 0  # workers that ended while decoding this file
        for _ in range(4):  # bounded: a worker dead between files does not count
            try:
                future = worker.pool.submit(
                    self._work, str(path), self.spec, data, logger.getEffectiveLevel()
                )
            except BrokenProcessPool:  # it ended between files: not this file's doing
                worker = self._replace(worker)
                if worker is None:
                    return self._here(path, data)
                continue
            except RuntimeError:  # shut down meanwhile: the daemon is stopping
                return self._here(path, data)
            try:
                decoded = future.result()
            except cf.CancelledError:  # closed meanwhile
                return self._here(path, data)
            except BrokenProcessPool:
                ended += 1
                if ended == 2:
                    self._discard(worker)
                    raise ImageDecodeError(path, CRASHED) from None
                worker = self._replace(worker)
                if worker is None:
                    raise ImageDecodeError(path, NO_WORKER) from None
                continue
            for name, level, message in decoded.records:
                logging.getLogger(name).log(level, "%s", message)
            if decoded.error is not None:
                raise decoded.error
            assert decoded.result is not None
            return decoded.result
        raise ImageDecodeError(path, CRASHED)

    def _here(self, path: Path, data: bytes) -> tuple[np.ndarray, ImageMeta]:
        return load_model_input(path, self.spec, data=data)

    def ready(self, timeout: float = START_TIMEOUT) -> bool:
        """Start this thread's worker and wait until it runs (tests; a warm start); False
        when it cannot be started or does not run within ``timeout`` seconds."""
        worker = self._worker()
        return worker is not None and self._running(worker, timeout)

    def _worker(self) -> _Worker | None:
        """This thread's worker, its start begun if need be (None: decode in the thread)."""
        if self._closed:
            return None
        worker: _Worker | None = getattr(self._local, "worker", None)
        if worker is None:
            worker = self._start()
            self._local.worker = worker
        return worker

    def _replace(self, dead: _Worker) -> _Worker | None:
        """A new worker for this thread in place of ``dead``, once it runs (None: none can
        be started now; decodes then stay in the thread)."""
        self._discard(dead)
        worker = self._worker()
        if worker is None or not self._running(worker, START_TIMEOUT):
            return None
        return worker

    def _running(self, worker: _Worker, timeout: float) -> bool:
        try:
            worker.started.result(timeout)
            return True
        except cf.TimeoutError:
            self._give_up(f"a new decoder process did not start within {timeout:g} s")
        except Exception as exc:
            self._give_up(f"cannot start a decoder process ({type(exc).__name__}: {exc})")
        return False

    def _start(self) -> _Worker | None:
        """A pool of one process, its start begun (:func:`xrwatch.forkworkers.launch`)."""
        with self._lock:
            if self._closed:
                return None
            try:
                pool = forkworkers.pool(1, niceness=NICENESS)
            except (OSError, ValueError) as exc:
                self._closed = True
                logger.warning("cannot start a decoder process (%s): files are decoded in "
                               "the daemon's threads", exc)  # fmt: skip
                return None
            worker = _Worker(pool, forkworkers.launch(pool))
            self._workers.append(worker)
            return worker

    def _discard(self, worker: _Worker) -> None:
        self._local.worker = None
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
        worker.pool.shutdown(wait=False, cancel_futures=True)

    def _give_up(self, why: str) -> None:
        logger.warning("%s: files are decoded in the daemon's threads", why)
        self.close(wait=False)

    def close(self, wait: bool = True) -> None:
        """End the workers (after the decodes in progress); later decodes run in the thread."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.pool.shutdown(wait=wait, cancel_futures=True)

    def pids(self) -> list[int]:
        """The worker processes running now (tests, ``benchmarks/decode.py``)."""
        with self._lock:
            workers = list(self._workers)
        return [pid for w in workers for pid in (w.pool._processes or {})]
