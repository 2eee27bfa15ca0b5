"""watchdog observers that walk a folder tree without recursion.

watchdog walks a watched tree recursively (``os.walk`` before Python 3.12 for inotify,
when watching and for the events of a folder moved in; its own ``DirectorySnapshot.walk``
for polling): a tree about a thousand folders deep, present at start or moved in, raises
``RecursionError`` in the observer. These subclasses (and the two event generators the
inotify emitter calls, replaced by equivalents) walk iteratively instead; everything else
is watchdog's. (Folders deeper than :data:`xrwatch.serve.watcher.MAX_DEPTH` are still
watched, cheaply, but their files are not read: see the watcher.)

The inotify observer's reader thread (:class:`_Reader`) also gives its three descriptors
back when it is stopped before its first read, as a watch whose start failed is (watchdog
leaves them open then; on a busy machine, on every retry of the watch).

``inotify_observer(unwatched=...)`` adds no inotify watch to the folders that predicate
names (the watcher's ignored folders, e.g. the DICOM receiver's hidden ``.parts``): what is
written there wakes no thread. A folder renamed out of such a name into a watched one is
watched from then on, its contents reported as created (watchdog's handling of a folder
moved in from outside the watch). A file renamed into the watch from such a folder (or from
outside INCOMING) is reported as a move, as a rename within the watch is, so it is taken at
once rather than after ``stable_seconds``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, AnyStr

import watchdog.observers.inotify as _inotify_module
from watchdog.events import DirCreatedEvent, DirMovedEvent, FileCreatedEvent, FileMovedEvent
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import (
    InotifyConstants,
    InotifyEmitter,
    InotifyEvent,
    InotifyObserver,
    InotifyWatchGroup,
    Mask,
)
from watchdog.observers.inotify_c import InotifyFD
from watchdog.observers.inotify_move_event_grouper import PathedInotifyEvent
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


def _sub_created_events(src_dir_path: Any) -> Iterator[DirCreatedEvent | FileCreatedEvent]:
    """watchdog's ``generate_sub_created_events``, walking iteratively."""
    for root, directories, filenames in walk(src_dir_path):
        for directory in directories:
            yield DirCreatedEvent(os.path.join(root, directory), is_synthetic=True)
        for filename in filenames:
            yield FileCreatedEvent(os.path.join(root, filename), is_synthetic=True)


def _sub_moved_events(src_dir_path: Any, dest_dir_path: Any) -> Iterator[Any]:
    """watchdog's ``generate_sub_moved_events``, walking iteratively."""
    for root, directories, filenames in walk(dest_dir_path):
        for name, cls in [(d, DirMovedEvent) for d in directories] + [
            (f, FileMovedEvent) for f in filenames
        ]:
            full_path = os.path.join(root, name)
            renamed = src_dir_path + full_path[len(dest_dir_path) :] if src_dir_path else ""
            yield cls(renamed, full_path, is_synthetic=True)


# the inotify emitter looks these up in its module when a folder is moved in
_inotify_module.generate_sub_created_events = _sub_created_events  # type: ignore[assignment]
_inotify_module.generate_sub_moved_events = _sub_moved_events  # type: ignore[assignment]


@dataclass
class _WatchGroup(InotifyWatchGroup):
    unwatched: Callable[[bytes], bool] | None = field(default=None, kw_only=True)

    def _skip(self, path: bytes) -> bool:
        return path != self.path and self.unwatched is not None and self.unwatched(path)

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
            dirnames[:] = [d for d in dirnames if not self._skip(os.path.join(root, d))]
        return events

    def _add_callback(self, path: bytes) -> None:
        if not self._skip(path):
            super()._add_callback(path)

    def _add_all_callbacks(self, path: bytes) -> None:
        is_dir = os.path.isdir(path)
        self._add_callback(path)
        if is_dir and self.is_recursive and not self._skip(path):
            for root, dirnames, _ in walk(path):
                dirnames[:] = [d for d in dirnames if not self._skip(os.path.join(root, d))]
                for dirname in dirnames:  # walk() enters only these (it reads the list after)
                    self._add_callback(os.path.join(root, dirname))


class _InotifyEmitter(InotifyEmitter):
    def __init__(
        self, *args: Any, unwatched: Callable[[bytes], bool] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._unwatched = unwatched

    def on_thread_start(self) -> None:
        self._inotify = _WatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
            unwatched=self._unwatched,
        )

    def build_and_queue_event(self, event: Any, *, full_events: bool = False) -> None:
        # A file renamed in with no IN_MOVED_FROM in the watch (from an unwatched hidden
        # folder such as the receiver's .parts, or from outside INCOMING): a rename is
        # atomic, so it is a move (offered complete), not a creation (which would wait
        # stable_seconds). watchdog's own "full events" form of the same event.
        if (
            isinstance(event, PathedInotifyEvent)
            and event.ev.is_moved_to
            and not event.ev.is_directory
        ):
            self.queue_event(FileMovedEvent("", self._decode_path(event.path)))
            return
        super().build_and_queue_event(event, full_events=full_events)


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


class _Reader(InotifyFD):
    """watchdog's inotify reader thread, which also gives its descriptors (the inotify
    instance and its wake-up pipe) back when it is stopped before its first read.

    watchdog hands the closing to the reader thread while that thread may be reading, and
    its thread closes them only after a read; stopped before the first one (a watch whose
    start failed at once, sooner on a busy machine) it ends with all three still open.
    """

    _released = False

    def _close_resources(self) -> None:
        self._released = True
        super()._close_resources()

    def run(self) -> None:
        try:
            super().run()
        finally:
            with self._lock:
                if not self._released:
                    self._closed = True  # a later close() has nothing left to do
                    self._close_resources()


class _InotifyObserver(InotifyObserver):
    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:  # as watchdog's own schedule does, with the reader above
            if self._inotify_fd is None:
                reader = _Reader()
                reader.start()
                self._inotify_fd = reader
                self._emitter_kwargs["inotify_fd"] = reader
        return super().schedule(*args, **kwargs)


def inotify_observer(unwatched: Callable[[bytes], bool] | None = None) -> BaseObserver:
    """watchdog's ``InotifyObserver``, walking iteratively, whose reader thread never keeps
    its descriptors; no watch on a folder (never the root) for which ``unwatched(path)``."""
    observer = _InotifyObserver()
    observer._emitter_class = _InotifyEmitter
    if unwatched is not None:
        observer._emitter_kwargs["unwatched"] = unwatched
    return observer
