"""Waiting until a file is complete before anyone reads it.

A candidate is *ready* when it was closed after writing (inotify ``IN_CLOSE_WRITE``) or
moved in by a rename, and has not changed since; or when its size and mtime have not
changed for ``stable_seconds``. "Changed" compares size, mtime, ctime and inode, so a
replacement with the same size and mtime (``cp -p``, rsync, unzip) counts. Readiness is
necessary, not sufficient: the daemon still runs the foundation's truncation checks, and a
truncated file goes back here to wait.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What must stay the same for a file to be unchanged: size, mtime, ctime, inode."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass
class _Entry:
    sig: tuple[int, int, int, int]  # signature(lstat)
    changed_at: float  # monotonic time of the last observed change
    seen_at: float  # wall time the file was first seen (for latency figures)
    complete: bool  # closed after writing / renamed in, with no change since
    not_before: float  # monotonic: do not re-check before this (back-off for truncated files)


@dataclass(frozen=True)
class Candidate:
    """A file ready to be read: its absolute path, its stat then, and when it was first seen."""

    path: Path
    size: int
    mtime_ns: int
    seen_at: float
    ctime_ns: int = 0
    ino: int = 0


class StabilityTracker:
    """Thread-safe: the watcher thread offers paths, the daemon's loop takes ready ones."""

    def __init__(
        self, stable_seconds: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stable_seconds = stable_seconds
        self._clock = clock
        self._entries: dict[Path, _Entry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def offer(
        self,
        path: Path,
        *,
        complete: bool = False,
        delay: float = 0.0,
        seen_at: float | None = None,
    ) -> None:
        """Note that ``path`` appeared or changed; ``complete`` when closed or renamed in."""
        try:
            st = os.lstat(path)
        except OSError:
            self.forget(path)
            return
        now = self._clock()
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                self._entries[path] = _Entry(
                    signature(st),
                    now,
                    seen_at if seen_at is not None else time.time(),
                    complete,
                    now + delay,
                )
                return
            if signature(st) != entry.sig:
                entry.sig, entry.changed_at = signature(st), now
                entry.complete = complete
            elif complete:
                entry.complete = True
            entry.not_before = max(entry.not_before, now + delay)

    def forget(self, path: Path) -> None:
        with self._lock:
            self._entries.pop(path, None)

    def take_ready(self, limit: int | None = None) -> list[Candidate]:
        """Remove and return up to ``limit`` ready candidates (oldest first)."""
        now = self._clock()
        with self._lock:
            due = [
                (p, e)
                for p, e in self._entries.items()
                if now >= e.not_before and (e.complete or now - e.changed_at >= self.stable_seconds)
            ]
        due.sort(key=lambda item: item[1].seen_at)
        out: list[Candidate] = []
        for path, entry in due:
            if limit is not None and len(out) >= limit:
                break
            try:
                st = os.lstat(path)
            except OSError:
                self.forget(path)
                continue
            with self._lock:
                if self._entries.get(path) is not entry:
                    continue
                if signature(st) != entry.sig:
                    entry.sig = signature(st)
                    entry.changed_at, entry.complete = now, False
                    continue
                del self._entries[path]
            out.append(
                Candidate(
                    path, st.st_size, st.st_mtime_ns, entry.seen_at, st.st_ctime_ns, st.st_ino
                )
            )
        return out
