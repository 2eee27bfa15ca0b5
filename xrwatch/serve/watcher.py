"""Finding files: watchdog events, the backlog scan, and periodic rescans.

The observer (inotify, or polling with ``--poll`` for SMB/NFS shares where inotify sees
nothing) reports created, modified, closed-after-write and moved-in files to a
:class:`~xrwatch.serve.stability.StabilityTracker`. A folder created or moved in is
scanned, since its files may predate the watch on it. The backlog scan runs *after* the
watch is scheduled, so no file can fall between the two; the periodic rescan catches events
lost to an inotify queue overflow or a remount.
"""

from __future__ import annotations

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
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from xrwatch.inputs import is_ignored
from xrwatch.serve.stability import StabilityTracker

logger = logging.getLogger(__name__)


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
        if rel in ("", ".") or is_ignored(rel, self.ignore):
            return None
        return rel

    def _offer(self, path: str | Path, *, complete: bool = False) -> None:
        if self.relative(path) is not None:
            self.tracker.offer(Path(path), complete=complete)

    def start(self) -> None:
        """Schedule the watch (call :meth:`scan` after this for the backlog)."""
        observer: BaseObserver = (
            PollingObserver(timeout=self._poll_interval) if self.poll else Observer()
        )
        observer.schedule(_Handler(self), str(self.root), recursive=True)
        observer.start()
        self._observer = observer
        logger.info(
            "watching %s (%s)", self.root, "polling" if self.poll else type(observer).__name__
        )

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None

    def alive(self) -> bool:
        """Whether the watch still runs (an inotify watch ends when its folder is removed)."""
        obs = self._observer
        return (
            obs is not None
            and obs.is_alive()
            and bool(obs.emitters)
            and all(e.is_alive() for e in obs.emitters)
        )

    def ensure_alive(self) -> None:
        """Restart a watch that ended (folder removed and recreated, share remounted)."""
        if self._observer is None or self.alive():
            return
        if not self.root.is_dir():
            logger.error("the watched folder %s is gone; waiting for it to come back", self.root)
            return
        logger.warning("the watch on %s had ended; starting it again", self.root)
        self.stop()
        self.start()

    def scan(self, folder: Path | None = None) -> int:
        """Offer every file under ``folder`` (default: the root); return how many."""
        count = 0
        stack = [folder or self.root]
        while stack:
            current = stack.pop()
            try:
                entries = list(os.scandir(current))
            except OSError as exc:
                logger.warning("cannot list %s: %s", current, exc.strerror or exc)
                continue
            for entry in entries:
                rel = self.relative(entry.path)
                if rel is None:
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if self._skip is not None and self._skip(rel, st):
                    continue
                self.tracker.offer(Path(entry.path))
                count += 1
        return count


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        if isinstance(event, (DirCreatedEvent, DirMovedEvent)):
            target = os.fsdecode(event.dest_path) if isinstance(event, DirMovedEvent) else src
            if self.w.relative(target) is not None:
                self.w.scan(Path(target))  # its files may predate the watch on it
        elif isinstance(event, FileMovedEvent):
            self.w._offer(os.fsdecode(event.dest_path), complete=True)  # a rename is atomic
        elif isinstance(event, FileClosedEvent):
            self.w._offer(src, complete=True)
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            self.w._offer(src)
        elif isinstance(event, FileDeletedEvent):
            self.w.tracker.forget(Path(src))
