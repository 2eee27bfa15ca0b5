"""The receiver's spool, ``INCOMING/dicom``, reached without ever following a link.

Whoever can write to INCOMING could replace ``INCOMING/dicom`` (or a study folder in it)
by a symbolic link to anywhere; every received image, full of PHI, would then be written
there. So, as :mod:`xrwatch.safefs` reads INCOMING, the spool is reached from a
descriptor of INCOMING one component at a time with ``O_NOFOLLOW``: a link fails with
``ELOOP`` and nothing is written through it. Names inside are made of validated UIDs only.

A C-STORE's data set streams into a hidden temporary file in ``INCOMING/dicom/.parts`` as
it arrives (:class:`PartFile`, what pynetdicom writes into instead of memory), with the size
limit checked on every write; once complete and checked it is renamed into
``<Study UID>/<Series UID>/<SOP UID>.dcm``: the same file system, so no copy. ``.parts`` is
hidden, so the folder watch neither reads it nor watches it
(:class:`xrwatch.serve.watcher.FolderWatcher`): writing, closing and removing a part wakes
nobody; only the rename into its series folder is an event.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from xrwatch.dicom.files import PART_SUFFIX
from xrwatch.errors import ConfigError
from xrwatch.safefs import open_dir

logger = logging.getLogger(__name__)

SPOOL = "dicom"  # subfolder of INCOMING the receiver writes into
PARTS = ".parts"  # subfolder of the spool the data sets stream into (hidden: not watched)
WRITE_BUFFER = 1 << 20  # bytes a PartFile gathers before it writes them
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _make_dir(name: str, parent: int) -> None:
    """Create the folder ``name`` in ``parent`` unless it exists (never following a link at
    the name); a new folder's name is synced, so it survives a power cut."""
    try:
        os.mkdir(name, 0o750, dir_fd=parent)
        os.fsync(parent)
    except FileExistsError:
        pass


class Spool:
    """``INCOMING/dicom``, every access through descriptors that follow no link."""

    def __init__(self, incoming: Path) -> None:
        self.incoming = incoming
        self.path = incoming / SPOOL

    def ensure(self) -> None:
        """Create the spool if missing; raise :class:`ConfigError` if it is a link or not
        a folder (a start-up error: nothing would be received)."""
        try:
            fd = open_dir(self.incoming, [])
            try:
                _make_dir(SPOOL, fd)
            finally:
                os.close(fd)
            os.close(self.open_parts())  # makes .parts too
        except OSError as exc:
            raise ConfigError(self.refusal(exc)) from None

    def refusal(self, exc: OSError) -> str:
        """The one line that says why the spool cannot be used (naming the spool, or its
        ``.parts`` folder when the spool itself can be reached)."""
        where = self.path
        try:
            os.close(self.open())
            where = self.path / PARTS
        except OSError:
            pass
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return (
                f"{where}: the DICOM receiver's spool is a symbolic link or not a folder; "
                "refusing to write received images through it (remove it, or make it a "
                "real folder owned by the daemon's user)"
            )
        return f"{where}: the DICOM receiver's spool cannot be opened ({exc.strerror or exc})"

    def open(self) -> int:
        """A descriptor of the spool folder (the caller closes it). Raises ``OSError``
        (``ELOOP``: a link) when it cannot be reached without following a link."""
        return open_dir(self.incoming, [SPOOL])

    def open_parts(self) -> int:
        """A descriptor of the spool's ``.parts`` folder, reached as :meth:`open` is; made
        again if it was removed while the daemon runs."""
        spool = self.open()
        try:
            try:
                return os.open(PARTS, _DIR_FLAGS, dir_fd=spool)
            except FileNotFoundError:
                _make_dir(PARTS, spool)
                return os.open(PARTS, _DIR_FLAGS, dir_fd=spool)
        finally:
            os.close(spool)

    def new_part(self) -> tuple[int, str]:
        """A new hidden temporary file in ``.parts``: ``(write descriptor, name)``."""
        parts = self.open_parts()
        try:
            name = f".{secrets.token_hex(8)}{PART_SUFFIX}"
            return os.open(name, _NEW_FILE, 0o640, dir_fd=parts), name
        finally:
            os.close(parts)

    def read_part(self, name: str) -> int:
        """A read descriptor of the temporary file ``name`` (the caller closes it)."""
        parts = self.open_parts()
        try:
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parts)
        finally:
            os.close(parts)

    def discard(self, name: str) -> None:
        """Remove the temporary file ``name`` from ``.parts``, if it is still there."""
        try:
            parts = self.open_parts()
        except OSError:
            return
        try:
            os.unlink(name, dir_fd=parts)
        except OSError:
            pass
        finally:
            os.close(parts)

    def commit(self, part: str, study: str, series: str, filename: str) -> str:
        """Rename the temporary file ``part`` to ``<study>/<series>/<filename>`` (replacing
        a file there), durably; return that path relative to INCOMING. The caller fsynced
        the file. Raises ``OSError`` (a link in the way: ``ELOOP``)."""
        fds = [self.open()]
        try:
            parts = os.open(PARTS, _DIR_FLAGS, dir_fd=fds[0])
            fds.insert(0, parts)  # the folders below are made from the spool, fds[-1]
            for name in (study, series):
                parent = fds[-1]
                _make_dir(name, parent)
                fds.append(os.open(name, _DIR_FLAGS, dir_fd=parent))
            os.rename(part, filename, src_dir_fd=parts, dst_dir_fd=fds[-1])
            os.fsync(fds[-1])
        finally:
            for fd in fds:
                os.close(fd)
        return f"{SPOOL}/{study}/{series}/{filename}"

    def exists(self, study: str, series: str, filename: str) -> bool:
        try:
            spool = self.open()
        except OSError:
            return False
        try:
            os.stat(f"{study}/{series}/{filename}", dir_fd=spool, follow_symlinks=False)
            return True
        except OSError:
            return False
        finally:
            os.close(spool)

    def remove_stale_parts(self) -> int:
        """Delete the temporary files a killed daemon left in the spool; return how many.
        Walks without following links: nothing outside the real spool is touched."""
        try:
            spool = self.open()
        except OSError:
            return 0
        n = 0
        try:
            for _top, _dirs, names, dir_fd in os.fwalk(".", dir_fd=spool, follow_symlinks=False):
                for name in names:
                    if name.startswith(".") and name.endswith(PART_SUFFIX):
                        try:
                            os.unlink(name, dir_fd=dir_fd)
                            n += 1
                        except OSError:
                            pass
        finally:
            os.close(spool)
        return n


class PartFile:
    """The file pynetdicom streams one C-STORE data set into (instead of memory).

    It has what pynetdicom uses of a ``NamedTemporaryFile``: ``name``, ``write``,
    ``file.flush`` and ``close``. Past ``limit`` bytes it stops writing, removes itself and
    calls ``over_limit(size)`` once (the receiver then ends the association): the data
    set is refused while it streams in, never held in memory or on disk in full. The
    sha256 of everything written (file meta included) tells a resend from a correction.
    Writes are gathered up to :data:`WRITE_BUFFER` bytes (pynetdicom hands over one PDU at a
    time, 16 KiB from DCMTK's storescu): one ``write`` and one inotify event on INCOMING per
    MiB instead of one per PDU; :meth:`close` writes the rest.
    """

    def __init__(self, spool: Spool, limit: int, over_limit: Callable[[int], None]) -> None:
        self.spool = spool
        self.fd, self.part = spool.new_part()
        self.name = str(spool.path / PARTS / self.part)
        self.file = self
        self.limit = limit
        self.size = 0
        self.over = False
        self.committed = False
        self._over_limit = over_limit
        self._hash = hashlib.sha256()
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        n = len(data)
        if self.over or self.fd < 0:
            return n
        self.size += n
        if self.size > self.limit:
            self.over = True
            self.discard()
            self._over_limit(self.size)
            return n
        self._hash.update(data)
        self._buffer += data
        if len(self._buffer) >= WRITE_BUFFER:
            self._drain()
        return n

    def _drain(self) -> None:
        done = 0
        with memoryview(self._buffer) as view:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        self._buffer = bytearray()

    def flush(self) -> None:
        """Nothing: pynetdicom calls it after every fragment; :meth:`close` writes."""

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        """Write what is buffered (an error here fails the C-STORE) and close."""
        if self.fd < 0:
            return
        try:
            self._drain()
        finally:
            os.close(self.fd)
            self.fd = -1
            self._buffer = bytearray()

    def discard(self) -> None:
        """Close and remove the temporary file (unless it was committed)."""
        self._buffer = bytearray()  # never written: the file goes
        self.close()
        if not self.committed:
            self.spool.discard(self.part)
