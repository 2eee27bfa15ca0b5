"""Where each result's SR (and heatmap SC) is built and written: :func:`build`, run in a
separate process by :class:`BuilderProcess` so that the daemon's own threads never wait for it.

highdicom builds a TID 1500 SR in pure Python, about 40 CPU ms per result on these 2 cores
(``benchmarks/sr_build.py``), all of it holding the interpreter lock. In the daemon's
process that lock is what pynetdicom's reception threads, the intake and ``/healthz`` need:
sampled with ``py-spy record --gil`` during a C-STORE burst, the SR writer held it in 54 % of
the samples, and storescu's instances were acknowledged 4x slower than by the idle daemon.

:class:`BuilderProcess` runs :func:`build` in one worker process, one item at a time. The
worker comes from the daemon's fork server (:mod:`xrwatch.forkworkers`: started once, from
a process that runs no threads, with this module and highdicom imported once), ignores
SIGINT/SIGTERM (the daemon decides when it ends) and dies with the fork server, which ends
when the daemon does (kill -9 included). A worker that dies mid-build fails that item like
any other error (retried with back-off, nothing lost); the next item gets a new worker.
Once closed (the daemon stopping), or when no process can be started, builds run in the
caller's thread. The worker starts with the first SR (:meth:`BuilderProcess.start` starts
it earlier; the daemon does not: started with every DICOM node, the fork server's second of
imports made each of the test suite's short-lived daemons slower to stop, and the suite 5
minutes longer).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import logging
import threading
import warnings
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread

from xrwatch import forkworkers
from xrwatch.atomic import write_atomic
from xrwatch.dicom.files import PART_SUFFIX
from xrwatch.dicom.uids import is_valid_uid, is_xrwatch_uid

logger = logging.getLogger(__name__)

SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# the worker's niceness: SRs are built with the CPU that receiving, decoding and running the
# model leave (benchmarks/dicom_receive.py: the builder takes ~120 CPU ms per result)
NICENESS = 10


class Unbuildable(ValueError):
    """A source that can never give an SR (e.g. its UIDs are not UIDs): parked at once."""


class Dropped(Exception):
    """No SR is due for this input after all."""


class BuildError(Exception):
    """Building failed (the message says why); retried with back-off."""


@dataclass(frozen=True)
class BuildJob:
    """One result's SR to build; everything :func:`build` needs, picklable."""

    sources: tuple[str, ...]  # where the classified file may be: INCOMING, the archive
    source_sop_uid: str
    record: dict[str, Any]
    model_name: str
    instance_number: int
    reports: str
    rel: str  # the SR's path in REPORTS (``writer.sr_relpath``)


@dataclass
class Built:
    written: list[tuple[str, str]]  # (SOP Instance UID, path in REPORTS)
    notes: list[str] = field(default_factory=list)  # warnings for the caller to log


def inside(root: Path, rel: str) -> Path:
    """``root / rel``, refused unless it resolves under ``root`` (links included)."""
    base = root.resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(base) or target == base:
        raise Unbuildable(f"{rel!r} does not resolve to a file under {base}")
    return target


def build(job: BuildJob) -> Built:
    """Write the SR (and the overlay SC) of ``job``. Raises :class:`Dropped`,
    :class:`Unbuildable` or :class:`BuildError` (any other failure, with its message)."""
    try:
        return _build(job)
    except (Dropped, Unbuildable, BuildError):
        raise
    except Exception as exc:  # re-raised as a plain, picklable error with the message
        raise BuildError(str(exc) or type(exc).__name__) from None


def _build(job: BuildJob) -> Built:
    from xrwatch.dicom.sc import build_sc
    from xrwatch.dicom.sr import build_sr, not_attempted_reason

    source_path = next((Path(p) for p in job.sources if p and Path(p).is_file()), None)
    if source_path is None:
        raise FileNotFoundError(
            "the source file is no longer in INCOMING or the archive; its header "
            "(patient and study) is needed for the SR"
        )
    source = dcmread(source_path, force=True, stop_before_pixels=True)
    if str(source.get("SOPInstanceUID", "")) != job.source_sop_uid:
        raise ValueError("the file at this path is no longer the instance classified")
    if is_xrwatch_uid(source.get("SOPInstanceUID")):
        raise Dropped("the input is xrwatch's own output")
    if not_attempted_reason(job.record) and "Rows" not in source:
        raise Dropped("the input is no image")
    for keyword in SOURCE_UIDS:
        if not is_valid_uid(source.get(keyword)):
            raise Unbuildable(f"its {keyword} is not a valid DICOM UID")
    reports = Path(job.reports)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom's warnings quote patient names
        sr = build_sr(source, job.record, job.model_name, instance_number=job.instance_number)
    built = Built([_save(reports, sr, job.rel, source)])
    png = _heatmap(job, reports, source, built.notes)
    if png is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sha = str(job.record.get("model_sha256") or "")
            sc = build_sc(source, png, sha, instance_number=job.instance_number)
        built.written.append(_save(reports, sc, job.rel.replace(".SR.dcm", ".SC.dcm"), source))
    return built


def _heatmap(job: BuildJob, reports: Path, source: Dataset, notes: list[str]) -> Path | None:
    """The overlay PNG to send as an SC: only for a judged input that has one."""
    from xrwatch.dicom.sr import not_attempted_reason

    heatmap = job.record.get("heatmap")
    if not heatmap or not_attempted_reason(job.record, source) is not None:
        return None
    try:
        png = inside(reports, str(heatmap))
    except Unbuildable as exc:  # never from the daemon; the overlay is optional
        notes.append(f"its heatmap {exc}; SR without overlay")
        return None
    if not png.is_file():
        notes.append("its heatmap is gone; SR without overlay")
        return None
    return png


def _save(reports: Path, ds: Dataset, rel: str, source: Dataset) -> tuple[str, str]:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    target = inside(reports, rel)
    write_atomic(target, buf.getvalue(), suffix=PART_SUFFIX)
    back = dcmread(target)  # validate: a PACS will read exactly these bytes
    if back.SOPInstanceUID != ds.SOPInstanceUID or back.StudyInstanceUID != source.StudyInstanceUID:
        raise ValueError(f"{target}: re-read instance does not match what was built")
    return str(ds.SOPInstanceUID), rel


class BuilderProcess:
    """Runs :func:`build` in one worker process (see the module's docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: cf.ProcessPoolExecutor | None = None
        self._closed = False

    def run(self, job: BuildJob) -> Built:
        submitted = self._submit(build, job)
        if submitted is None:
            return build(job)
        pool, future = submitted
        try:
            return future.result()
        except BrokenProcessPool:
            self._discard(pool)
            raise BuildError("the SR builder process ended while building it") from None

    def start(self) -> None:
        """Start the worker now, without waiting for it (:func:`xrwatch.forkworkers.launch`):
        the fork server's imports overlap what the caller does meanwhile instead of delaying
        the first SR. A worker that fails to start is replaced by the first build."""
        with self._lock:
            pool = None if self._closed else (self._pool or self._start())
        if pool is not None:
            forkworkers.launch(pool)

    def _submit(
        self, fn: Callable[..., Any], *args: Any
    ) -> tuple[cf.ProcessPoolExecutor, cf.Future[Any]] | None:
        """``fn(*args)`` given to the worker; None when builds run in the caller (closed, or
        no process can be started). A worker found dead first is replaced once."""
        for _ in range(2):
            with self._lock:
                pool = None if self._closed else (self._pool or self._start())
            if pool is None:
                return None
            try:
                return pool, pool.submit(fn, *args)
            except BrokenProcessPool:
                self._discard(pool)
            except (OSError, RuntimeError) as exc:  # no process can be started
                self._give_up(pool, f"cannot start the SR builder process ({exc})")
                return None
        return None

    def _discard(self, pool: cf.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def _start(self) -> cf.ProcessPoolExecutor | None:
        try:
            self._pool = forkworkers.pool(1, niceness=NICENESS)
        except (OSError, ValueError) as exc:
            logger.warning("cannot start the SR builder process (%s): SRs are built in the "
                           "daemon's process", exc)  # fmt: skip
            self._closed = True
            return None
        return self._pool

    def _give_up(self, pool: cf.ProcessPoolExecutor, why: str) -> None:
        logger.warning("%s: SRs are built in the daemon's process", why)
        with self._lock:
            self._closed = True
            self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """End the worker (after the build in progress); later builds run in the caller."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
