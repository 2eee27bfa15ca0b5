"""Reading and moving files under INCOMING without ever leaving it.

Anyone who can write to INCOMING can swap a folder for a symbolic link between the moment
a file is found and the moment it is read (``mv in/s in/.old; ln -s /etc in/s``). A path
re-resolved by name would then lead outside. So a file is reached from a descriptor of
INCOMING, one component at a time, with ``O_NOFOLLOW`` on every component
(:func:`open_dir`): a component that is a symbolic link fails with ``ELOOP`` instead of
being followed. The bytes classified are read from that descriptor, and the file moved to
the archive is the same inode (:func:`move_verified`), checked by device, inode, size,
mtime and ctime just before it is linked there; otherwise it is left where it is.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from xrwatch.atomic import make_dirs

logger = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused after fstat)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CHUNK = 1 << 20


@dataclass(frozen=True)
class FileId:
    """What identifies the content at a name: the inode and its size, mtime and ctime.

    ``cp -p``, rsync and unzip keep size and mtime but give a new inode (or ctime); a
    file is only "the same" when all five agree.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def same_inode(self, st: os.stat_result) -> bool:
        return (self.dev, self.ino) == (st.st_dev, st.st_ino)


class InputTooLarge(Exception):
    """The file grew past the size limit while it was read."""


def open_dir(root: Path, parts: Sequence[str]) -> int:
    """A descriptor of ``root/parts...``, opened without following any symbolic link.

    Raises ``OSError``: ``ELOOP``/``ENOTDIR`` when a component is a link or not a folder,
    ``ENOENT`` when one is gone. The caller closes the descriptor.
    """
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(dir_fd: int, name: str) -> int:
    """A read descriptor of ``name`` in ``dir_fd``; never follows a link, never blocks."""
    return os.open(name, _FILE_FLAGS, dir_fd=dir_fd)


def read_fd(
    fd: int, limit: int, *, stop: Callable[[], bool] = lambda: False
) -> tuple[bytes, os.stat_result] | None:
    """All the bytes of ``fd`` (at most ``limit``) and its fstat after reading.

    Reads in chunks and returns None as soon as ``stop()`` is true, so shutdown is never
    held up by a slow share. Raises :class:`InputTooLarge` past ``limit`` bytes.
    """
    os.set_blocking(fd, True)
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, CHUNK):
        total += len(chunk)
        if total > limit:
            raise InputTooLarge(f"more than {limit} bytes")
        chunks.append(chunk)
        if stop():
            return None
    return b"".join(chunks), os.fstat(fd)


def move_verified(
    root: Path, parts: Sequence[str], expected: FileId, dest_for: Callable[[], Path]
) -> Path | None:
    """Move ``root/parts`` to ``dest_for()`` if it is still the inode ``expected``.

    Returns where it went, or None when the name now holds another file (it is then left
    for processing). The folder is reached as in :func:`open_dir`, so nothing outside
    ``root`` is ever moved. Raises ``OSError`` when the move fails.
    """
    dir_fd = open_dir(root, parts[:-1])
    name = parts[-1]
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if FileId.of(st) != expected:
            return None
        while True:
            dest = dest_for()
            make_dirs(dest.parent)
            try:
                os.link(name, dest, src_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                continue  # taken meanwhile: the next free name
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
                    raise
                _copy_exclusive(dir_fd, name, st, dest)
                break
            if not expected.same_inode(os.lstat(dest)):  # swapped between stat and link
                os.unlink(dest)
                return None
            break
        again = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if expected.same_inode(again):
            os.unlink(name, dir_fd=dir_fd)
        else:
            logger.warning("%s: replaced while it was archived; the new file stays", dest.name)
        return dest
    finally:
        os.close(dir_fd)


def _copy_exclusive(dir_fd: int, name: str, st: os.stat_result, dest: Path) -> None:
    """Copy (another filesystem): from a descriptor of the verified inode, into a new file."""
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=dir_fd), dest)
        return
    src = open_file(dir_fd, name)
    try:
        if not FileId.of(os.fstat(src)).same_inode(st):
            raise OSError(errno.ESTALE, "replaced while it was archived", name)
        os.set_blocking(src, True)
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(out, "wb") as fh:
            while chunk := os.read(src, CHUNK):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(src)
