"""watchdog observers that walk a folder tree without recursion.

watchdog walks a watched tree recursively (``os.walk`` before Python 3.12 for inotify,
its own ``DirectorySnapshot.walk`` for polling): a tree about a thousand folders deep,
present at start or moved in, raises ``RecursionError`` in the observer. These
subclasses replace only those walks with an iterative one; everything else is
watchdog's. (Folders deeper than :data:`xrwatch.serve.watcher.MAX_DEPTH` are still
watched, cheaply, but their files are not read: see the watcher.)
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import Any, AnyStr

from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import (
    InotifyConstants,
    InotifyEmitter,
    InotifyEvent,
    InotifyObserver,
    InotifyWatchGroup,
    Mask,
)
from watchdog.observers.polling import PollingEmitter
from watchdog.utils.dirsnapshot import DirectorySnapshot


def walk(top: AnyStr) -> Iterator[tuple[AnyStr, list[AnyStr], list[AnyStr]]]:
    """``os.walk(top)`` (top-down, links not followed), with a stack instead of recursion."""
    stack = [top]
    while stack:
        root = stack.pop()
        dirs: list[AnyStr] = []
        files: list[AnyStr] = []
        try:
            with os.scandir(root) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    (dirs if is_dir else files).append(entry.name)
        except OSError:
            continue
        yield root, dirs, files
        stack.extend(os.path.join(root, d) for d in reversed(dirs))


class _WatchGroup(InotifyWatchGroup):
    def _recursive_simulate(self, src_path: bytes) -> list[InotifyEvent]:
        events = []
        for root, dirnames, filenames in walk(src_path):
            wd_root = self._active_callbacks_by_path.get(root)
            if wd_root is None:
                continue
            for dirname in dirnames:
                mask = Mask(InotifyConstants.IN_CREATE | InotifyConstants.IN_ISDIR)
                events.append(InotifyEvent(wd_root, mask, 0, dirname))
            for filename in filenames:
                events.append(InotifyEvent(wd_root, InotifyConstants.IN_CREATE, 0, filename))
        return events

    def _add_all_callbacks(self, path: bytes) -> None:
        is_dir = os.path.isdir(path)
        self._add_callback(path)
        if is_dir and self.is_recursive:
            for root, dirnames, _ in walk(path):
                for dirname in dirnames:
                    self._add_callback(os.path.join(root, dirname))


class _InotifyEmitter(InotifyEmitter):
    def on_thread_start(self) -> None:
        self._inotify = _WatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
        )


class _Snapshot(DirectorySnapshot):
    def walk(self, root: str) -> Iterator[tuple[str, os.stat_result]]:
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                names = [entry.name for entry in self.listdir(folder)]
            except OSError:
                continue  # gone or replaced meanwhile: empty, as watchdog treats it
            for name in names:
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    st = self.stat(path)
                    yield path, st
                    if self.recursive and stat.S_ISDIR(st.st_mode):
                        stack.append(path)


class _PollingEmitter(PollingEmitter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._take_snapshot = lambda: _Snapshot(
            self.watch.path, recursive=self.watch.is_recursive, stat=os.lstat
        )


class PollingObserver(BaseObserver):
    """watchdog's ``PollingObserver``, walking iteratively."""

    def __init__(self, *, timeout: float = 1.0) -> None:
        super().__init__(_PollingEmitter, timeout=timeout)


def inotify_observer() -> BaseObserver:
    """watchdog's ``InotifyObserver``, walking iteratively."""
    observer = InotifyObserver()
    observer._emitter_class = _InotifyEmitter
    return observer
