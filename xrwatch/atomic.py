"""Writing files so that a reader sees the old content or the new, never a part.

One definition for every report, heatmap, received DICOM and sidecar the daemon and the CLI
write: a temporary file beside the target, fsynced, then renamed over it, then the folder
fsynced (:func:`write_atomic`). :func:`replace_all` does the same for several files at once
with one wait for the disk (a batch's heatmaps, a flush's JSON reports).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes, *, suffix: str = ".tmp") -> None:
    """Write ``data`` to ``path`` so that a reader sees the old content or the new, and once
    this returns it survives a power cut: its folder made (:func:`make_dirs`), then
    :func:`replace_all` for this one file. The temporary file is hidden (``.``-prefixed,
    ending in ``suffix``) beside ``path``, so a watcher that skips hidden names never sees
    it. Raises the ``OSError`` that stopped it (the old file, if any, left as it was)."""
    make_dirs(path.parent)
    (error,) = replace_all([(path, data)], suffix=suffix)
    if error is not None:
        raise error


MAX_OPEN = 64  # replace_all keeps this many temporary files open at once, at most


def replace_all(
    files: Sequence[tuple[Path, bytes]], *, suffix: str = ".tmp"
) -> list[OSError | None]:
    """Write each ``(path, data)`` through a hidden temporary file in its folder, in passes: every
    temporary file is written, then every one's writeback is started, then every one is
    fsynced, then every one is renamed over its target, and last each folder renamed into
    is fsynced once. The disk writes the batch's data together instead of once per file
    (``benchmarks/explain.py`` times it); no target is replaced before its bytes are on the
    disk, and none is reported written before its new name is. More than
    :data:`MAX_OPEN` files go in groups of that many (each temporary file is open until its
    fsync).

    Returns, per file in order, None or the ``OSError`` that stopped it (its temporary file
    removed); one file's failure does not stop the others. Any other exception (an
    interrupt) removes every temporary file still there and is raised.
    """
    if len(files) > MAX_OPEN:
        return [
            result
            for start in range(0, len(files), MAX_OPEN)
            for result in replace_all(files[start : start + MAX_OPEN], suffix=suffix)
        ]
    results: list[OSError | None] = [None] * len(files)
    staged: list[tuple[int, BinaryIO, str]] = []  # (index, open temp file, its name)

    def drop(i: int, fh: BinaryIO, tmp: str, exc: OSError | None) -> None:
        with contextlib.suppress(OSError):
            fh.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc is not None:
            results[i] = exc

    try:
        for i, (path, data) in enumerate(files):
            try:
                fd, tmp = tempfile.mkstemp(prefix=".", suffix=suffix, dir=path.parent)
            except OSError as exc:
                results[i] = exc
                continue
            try:
                fh: BinaryIO = os.fdopen(fd, "wb")
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            staged.append((i, fh, tmp))
            try:
                fh.write(data)
                fh.flush()
            except OSError as exc:
                staged.pop()
                drop(i, fh, tmp, exc)
        for _, fh, _ in staged:  # start every file's writeback; the fsyncs below then wait
            _start_writeback(fh.fileno())  # for it together instead of one file at a time
        for i, fh, tmp in list(staged):
            try:
                os.fsync(fh.fileno())
                fh.close()
            except OSError as exc:
                staged.remove((i, fh, tmp))
                drop(i, fh, tmp, exc)
        renamed: dict[Path, list[int]] = {}  # folder -> files renamed into it
        while staged:
            i, fh, tmp = staged[0]
            try:
                os.replace(tmp, files[i][0])
                renamed.setdefault(files[i][0].parent, []).append(i)
            except OSError as exc:
                drop(i, fh, tmp, exc)
            staged.pop(0)
    except BaseException:
        for i, fh, tmp in staged:
            drop(i, fh, tmp, None)
        raise
    for folder, indices in renamed.items():
        try:
            fsync_dir(folder)
        except OSError as exc:  # the files are there, but their names may not survive a crash
            for i in indices:
                results[i] = exc
    return results


def _start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s data now, without waiting for it. On Linux,
    ``POSIX_FADV_DONTNEED`` does this (and drops the pages once they are clean); it is only
    a hint, so where it is missing or fails, the fsync that follows does all the work."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def fsync_dir(path: Path) -> None:
    """Make the names in folder ``path`` (a rename, a new file or folder) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new folders are durable too (each one's parent fsynced after it is
    made), without recursion (``Path.mkdir(parents=True)`` recurses once per level, and a
    thousand levels raise ``RecursionError``). When a file stands where a folder should be,
    raises ``NotADirectoryError`` naming that file."""
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                if not folder.is_dir():
                    raise
            fsync_dir(folder.parent)
    except (FileExistsError, NotADirectoryError) as exc:  # name what is in the way
        blocking = _not_a_folder(path)
        if blocking is None:
            raise
        raise NotADirectoryError(
            errno.ENOTDIR, f"{blocking} is not a folder", str(blocking)
        ) from exc


def _not_a_folder(folder: Path) -> Path | None:
    """The first component of ``folder`` that exists but is not a folder, if any."""
    for part in (*reversed(folder.parents), folder):
        if not part.is_dir():
            return part if os.path.lexists(part) else None
    return None


@contextlib.contextmanager
def immediate_transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` on an autocommit connection; ``ROLLBACK`` on any error."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
