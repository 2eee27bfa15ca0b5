"""Where the intake's decodes run: in the worker thread itself, or in a process of its own.

Decoding holds the interpreter lock: Pillow's and pylibjpeg's JPEG 2000 decoders for the
whole decode (a 206 ms frame), pylibjpeg's JPEG decoder for most of it
(``benchmarks/decoder_gil.py``). In a daemon with a DICOM port that lock is what
pynetdicom's reception needs for every PDU: sampled during a C-STORE burst
(``benchmarks/dicom_receive.py --gil-profile``) the two decode threads held it in 56 % of
the samples, and reception took 10-11 s instead of the idle daemon's 4 s.

:class:`Decoders` therefore runs each decode thread's decodes in a worker process of that
thread's own (``decode_in = "processes"``; ``"auto"``, the default, means processes with a
DICOM port and threads without, where a process start, about a second of CPU for the fork
server's imports, would buy nothing). The file's bytes go to the worker (the very bytes the
intake read and hashed), the model input and the :class:`ImageMeta` come back, with the log
records the decode wrote, which are logged here, in the daemon's format. Until a thread's
worker has started (the first decodes after a start) that thread decodes itself, so no file
waits for a process start.

The workers run at niceness 5: behind the daemon's own threads, which acknowledge C-STOREs
and run the model and need little CPU each, and ahead of the SR builder (niceness 10).
On 2 cores a burst of 200 C-STOREs reached the last report at 0.75-0.82 of the folder's
rate (two runs), against 0.62 decoding in threads, and was acknowledged 3.7 s sooner
(``benchmarks/dicom_receive.py``, docs/benchmarks.md).

One worker per thread, one decode at a time: a worker that ends mid-decode (a decoder that
crashes on a malformed file, the OOM killer) fails that file alone. It is tried once more in
a new worker; a second ending makes it an error row naming the file and why (nothing is
lost, the file is archived as failed like any unreadable one).

Memory: the decode budget (:mod:`xrwatch.imageio.budget`, ``XRWATCH_DECODE_MEMORY_MB``) is
shared out, each of the ``workers`` processes holding its share; a decode larger than its
share still runs (alone in its process), so at worst the decodes hold the budget plus one
such image (a 100 MP image, the pixel limit: under 1 GiB). Each worker also holds the file
it decodes and its libraries: 67 MiB resident, 41 MiB proportional (pages shared with the
fork server), after decoding the five real DICOMs of ``../shared``; ``deploy/README.md``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from xrwatch import forkworkers
from xrwatch.errors import ImageDecodeError
from xrwatch.imageio.budget import DECODE_BUDGET, set_decode_budget
from xrwatch.preprocess import PreprocessSpec, load_model_input

if TYPE_CHECKING:
    from xrwatch.imageio.types import ImageMeta

logger = logging.getLogger(__name__)

DecodeIn = Literal["auto", "threads", "processes"]
# the workers' niceness: behind the daemon's threads (a C-STORE waits on them, and they
# need little CPU), ahead of the SR builder (10), which works on results already reported
NICENESS = 5
CRASHED = (
    "the decoder process ended while decoding this file, twice (a decoder crash on malformed "
    "data, or the process was killed); the file was not decoded"
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


def decode_in_worker(
    path: str, spec: PreprocessSpec, data: bytes, level: int, budget: int
) -> _Decoded:
    """In a worker: :func:`load_model_input` of ``data`` within a decode budget of
    ``budget`` bytes, with the records logged at ``level`` or above (the daemon's level)
    collected for the daemon to log."""
    if DECODE_BUDGET.limit_bytes != budget:
        set_decode_budget(budget)
    root = logging.getLogger()
    collect = _Collect(level)
    root.addHandler(collect)
    root.setLevel(level)
    try:
        return _Decoded(result=load_model_input(path, spec, data=data), records=collect.records)
    except Exception as exc:  # sent back whole (ImageError pickles with path and reason)
        return _Decoded(error=exc, records=collect.records)
    finally:
        root.removeHandler(collect)


@dataclass
class _Worker:
    pool: cf.ProcessPoolExecutor
    started: cf.Future[int]  # done once the process runs


class Decoders:
    """The daemon's decodes (see the module's docstring); called by the decode threads."""

    def __init__(
        self,
        spec: PreprocessSpec,
        decode_in: DecodeIn,
        dicom_port: bool,
        workers: int = 1,
        work: Callable[[str, PreprocessSpec, bytes, int, int], _Decoded] = decode_in_worker,
    ) -> None:
        self.spec = spec
        self.workers = max(workers, 1)  # the decode threads, each with a worker process
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
            return load_model_input(path, self.spec, data=data)
        for _ in range(2):
            try:
                share = max(DECODE_BUDGET.limit_bytes // self.workers, 1)
                decoded = worker.pool.submit(
                    self._work, str(path), self.spec, data, logger.getEffectiveLevel(), share
                ).result()
            except BrokenProcessPool:
                self._discard(worker)
                worker = self._worker(wait=True)
                if worker is None:  # no process can be started now
                    break
                continue
            except RuntimeError:  # closed meanwhile: the daemon is stopping
                return load_model_input(path, self.spec, data=data)
            for name, level, message in decoded.records:
                logging.getLogger(name).log(level, "%s", message)
            if decoded.error is not None:
                raise decoded.error
            assert decoded.result is not None
            return decoded.result
        raise ImageDecodeError(path, CRASHED)

    def ready(self, timeout: float | None = None) -> bool:
        """Start this thread's worker and wait until it runs (tests; a warm start); False
        when it cannot be started or is not running after ``timeout`` seconds."""
        try:
            return self._worker(wait=True, timeout=timeout) is not None
        except cf.TimeoutError:
            return False

    def _worker(self, *, wait: bool = False, timeout: float | None = None) -> _Worker | None:
        """This thread's worker, started if need be (None: decodes stay in the thread)."""
        if self._closed:
            return None
        worker: _Worker | None = getattr(self._local, "worker", None)
        if worker is None:
            try:
                worker = self._start()
            except (OSError, ValueError, RuntimeError) as exc:
                self._give_up(f"cannot start a decoder process ({exc})")
                return None
            if worker is None:
                return None
            self._local.worker = worker
        if wait:
            try:
                worker.started.result(timeout)
            except BrokenProcessPool:
                self._discard(worker)
                self._give_up("a new decoder process ended at once")
                return None
        return worker

    def _start(self) -> _Worker | None:
        with self._lock:
            if self._closed:
                return None
            pool = forkworkers.pool(1, niceness=NICENESS)
            worker = _Worker(pool, pool.submit(os.getpid))
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
