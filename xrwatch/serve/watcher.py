"""Finding files: watchdog events, the backlog scan, and periodic rescans.

The observer (inotify, or polling with ``--poll`` for SMB/NFS shares where inotify sees
nothing) reports created, modified, closed-after-write and moved-in files to a
:class:`~xrwatch.serve.stability.StabilityTracker`. A folder created or moved in is
scanned, since its files may predate the watch on it. The backlog scan runs *after* the
watch is scheduled, so no file can fall between the two; the periodic rescan catches events
lost to an inotify queue overflow or a remount.

Files are read at most :data:`MAX_DEPTH` folders below INCOMING: a folder nested deeper is
offered itself (the daemon gives it one error row) and its contents are left alone. No
event and no scan can end the watch silently: an exception in the event handler is
logged, and a watch whose thread died is restarted on the next rescan.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

from xrwatch.inputs import is_ignored
from xrwatch.serve.names import escape_name
from xrwatch.serve.observers import PollingObserver, inotify_observer
from xrwatch.serve.stability import StabilityTracker

# The events _Handler acts on. Passed to watchdog as its filter, so that inotify is not asked
# for IN_OPEN / IN_CLOSE_NOWRITE: every read of a file in INCOMING (the pipeline's decode,
# the receiver's header check and fsync of its spool parts) would otherwise wake the
# observer thread for an event it drops.
EVENTS = (
    DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent, FileDeletedEvent,
    FileModifiedEvent, FileMovedEvent,
)  # fmt: skip

logger = logging.getLogger(__name__)

MAX_DEPTH = 32  # folders below INCOMING whose files are read; a deeper folder is an error row


def depth(rel: str) -> int:
    """Components of a '/'-separated relative path (``a/b.png``: 2)."""
    return rel.count("/") + 1


class FolderWatcher:
    """Feeds every complete-able file under ``root`` to ``tracker``."""

    def __init__(
        self,
        root: Path,
        tracker: StabilityTracker,
        *,
        ignore: tuple[str, ...],
        skip: Callable[[str, os.stat_result], bool] | None = None,
        poll: bool = False,
        poll_interval: float = 1.0,
    ) -> None:
        self.root = root
        self.tracker = tracker
        self.ignore = ignore
        self._skip = skip
        self.poll = poll
        self._poll_interval = poll_interval
        self._observer: BaseObserver | None = None

    def relative(self, path: str | Path) -> str | None:
        """``path`` relative to the root ('/'-separated), or None when outside or ignored."""
        try:
            rel = Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return None
        if rel in ("", ".") or depth(rel) > MAX_DEPTH + 1 or is_ignored(rel, self.ignore):
            return None
        return rel

    def unwatched(self, path: bytes) -> bool:
        """Whether the folder ``path`` below the root is ignored (a hidden folder, e.g. the
        DICOM receiver's ``.parts``): its files are never read, so inotify does not watch
        it and what is written there wakes no thread."""
        try:
            rel = Path(os.fsdecode(path)).relative_to(self.root).as_posix()
        except ValueError:
            return False
        return rel not in ("", ".") and is_ignored(rel, self.ignore)

    def _offer(self, path: str | Path, *, complete: bool = False) -> None:
        if self.relative(path) is not None:
            self.tracker.offer(Path(path), complete=complete)

    def start(self) -> None:
        """Schedule the watch (call :meth:`scan` after this for the backlog)."""
        self.stop()  # a previous watch, even one that failed to start, is given back
        observer: BaseObserver = (
            PollingObserver(timeout=self._poll_interval)
            if self.poll
            else inotify_observer(self.unwatched)
        )
        self._observer = observer  # before start(): stop() must clean up a failed start
        observer.schedule(_Handler(self), str(self.root), recursive=True, event_filter=list(EVENTS))
        observer.start()
        logger.info(
            "watching %s (%s)", self.root, "polling" if self.poll else type(observer).__name__
        )

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        try:
            observer.stop()
            if observer.is_alive():
                observer.join()
        except Exception as exc:  # a half-started observer: nothing left to stop
            logger.debug("stopping the observer: %s", exc)
        # An inotify observer starts its reader thread (an inotify descriptor and a pipe)
        # when it is built, and stops it only when its own thread ran: after a failed
        # start, stop it here, or every retry would keep three descriptors and a thread.
        reader = getattr(observer, "_inotify_fd", None)
        if reader is not None and reader.is_alive():
            with contextlib.suppress(Exception):
                reader.stop()
                reader.join(5.0)

    def alive(self) -> bool:
        """Whether the watch still runs (an inotify watch ends when its folder is removed)."""
        obs = self._observer
        reader = getattr(obs, "_inotify_fd", None)  # inotify: the thread that reads events
        return (
            obs is not None
            and obs.is_alive()
            and bool(obs.emitters)
            and all(e.is_alive() for e in obs.emitters)
            and (reader is None or reader.is_alive())
        )

    def ensure_alive(self) -> None:
        """Restart a watch that ended (folder removed and recreated, share remounted, an
        observer thread that died). A failed restart is logged and tried again next time;
        the rescans keep finding files meanwhile."""
        if self.alive():
            return
        if not self.root.is_dir():
            logger.error("the watched folder %s is gone; waiting for it to come back", self.root)
            return
        logger.warning("the watch on %s had ended; starting it again", self.root)
        self.stop()
        try:
            self.start()
        except Exception as exc:
            logger.error(
                "cannot watch %s (%s: %s); rescanning every rescan interval until it works",
                self.root,
                type(exc).__name__,
                exc,
            )

    def scan(self, folder: Path | None = None) -> int:
        """Offer every file under ``folder`` (default: the root); return how many."""
        count = 0
        stack = [folder or self.root]
        while stack:
            current = stack.pop()
            try:
                entries = list(os.scandir(current))
            except OSError as exc:
                logger.warning("cannot list %s: %s", escape_name(str(current)), exc.strerror or exc)
                continue
            for entry in entries:
                rel = self.relative(entry.path)
                if rel is None:
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False) and depth(rel) <= MAX_DEPTH:
                        stack.append(Path(entry.path))
                        continue
                    # a file, or a folder too deep to enter (offered: it gets an error row)
                    st = entry.stat(follow_symlinks=False)
                    if self._skip is not None and self._skip(rel, st):
                        continue
                    self.tracker.offer(Path(entry.path))
                except Exception as exc:  # one odd entry must not end the scan
                    logger.error("scan: skipping %s: %s", escape_name(rel), exc)
                    continue
                count += 1
        return count


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:  # the observer thread must not die of one event
            logger.exception("error handling a file-system event; the rescans will catch up")

    def _dispatch(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        if isinstance(event, (DirCreatedEvent, DirMovedEvent)):
            target = os.fsdecode(event.dest_path) if isinstance(event, DirMovedEvent) else src
            rel = self.w.relative(target)
            if rel is not None and depth(rel) > MAX_DEPTH:
                self.w.tracker.offer(Path(target))  # too deep to enter: an error row
            elif rel is not None:
                self.w.scan(Path(target))  # its files may predate the watch on it
        elif isinstance(event, FileMovedEvent):
            self.w._offer(os.fsdecode(event.dest_path), complete=True)  # a rename is atomic
        elif isinstance(event, FileClosedEvent):
            self.w._offer(src, complete=True)
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            self.w._offer(src)
        elif isinstance(event, FileDeletedEvent):
            self.w.tracker.forget(Path(src))
