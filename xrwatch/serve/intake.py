"""Intake: reading one candidate out of INCOMING safely, on a worker thread.

Owns what a worker does with a file found complete (:meth:`Intake.prepare`): reach it from
INCOMING without following links (a symbolic link is read only when it leads to a file
inside INCOMING), read it once and bounded (``max_file_mb``), hash the bytes read, claim it
in the ledger and decode those very bytes through :func:`xrwatch.preprocess.load_model_input`
(in the thread or in a decoder process: :mod:`xrwatch.serve.decoders`).
A DICOM object xrwatch made itself (its SR or heatmap Secondary Capture, routed back into
INCOMING: :func:`xrwatch.dicom.provenance.own_output`) is neither claimed nor decoded: it is
``own_output`` work, skipped with a log line, counted and archived, and not read again
while it stays unchanged.
A file that changed while it was looked at is requeued; one still being written (truncated,
or too short to identify) is waited for up to ``truncated_timeout``; one removed meanwhile
is not ours to report. The result is a :class:`Work`, which says what the worker concluded.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xrwatch.dicom import provenance
from xrwatch.errors import ImageError, TruncatedImageError
from xrwatch.imageio.detect import HEAD_BYTES, JPEG_SIGNATURE, PNG_SIGNATURE
from xrwatch.safefs import FileId, InputTooLarge, open_dir, open_file, read_fd
from xrwatch.safetext import printable
from xrwatch.serve.config import ServeConfig
from xrwatch.serve.decoders import Decoders
from xrwatch.serve.ledger import Ledger
from xrwatch.serve.names import escape_name
from xrwatch.serve.stability import Candidate, signature
from xrwatch.serve.watcher import MAX_DEPTH, depth

logger = logging.getLogger(__name__)


@dataclass
class Work:
    """One file through the pipeline; ``kind`` says what the worker concluded."""

    cand: Candidate
    rel: str
    kind: Literal["input", "error", "skip", "requeue", "done", "own_output"]
    row_id: int = 0
    sha256: str = ""
    array: np.ndarray | None = None
    meta: Any = None
    error: str = ""  # kind == "own_output": why it looks made by xrwatch
    done_state: str = ""  # for kind == "done": the recorded outcome
    delay: float = 0.0  # for kind == "requeue"
    parts: tuple[str, ...] = ()  # the path below INCOMING, as the OS names it
    fid: FileId | None = None  # the inode at the name when it was read: the one to archive
    refresh: dict[str, Any] | None = None  # kind == "done": rewrite the JSON with this record


class _Skip(Exception):
    """Not ours to report now: gone, moved away, or the daemon is stopping."""


class _Requeue(Exception):
    """Changed while it was looked at: wait for it to be complete again."""


@dataclass
class _Read:
    """What reading a file gave: its bytes, or why not (``error``), and its identity."""

    identity: str
    error: str = ""
    sha256: str = ""
    data: bytes | None = None


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


# the signature, the IHDR chunk (the size) and the next chunk's length and type: shorter,
# Pillow cannot tell a PNG still being written from a broken one
PNG_HEAD_BYTES = len(PNG_SIGNATURE) + 25 + 8


def too_short_to_identify(data: bytes) -> bool:
    """Whether ``data`` may be the start of an image still being written: empty, zeros
    only up to the DICOM marker (a preamble), or a PNG/JPEG shorter than its header. Such
    a file is waited for like a truncated one, instead of being an error at once."""
    if len(data) < HEAD_BYTES and not data.strip(b"\0"):
        return True
    if PNG_SIGNATURE.startswith(data[:8]) and len(data) < PNG_HEAD_BYTES:
        return True
    return JPEG_SIGNATURE.startswith(data[:3]) and len(data) < HEAD_BYTES


def own_output(data: bytes) -> str | None:
    """Why the DICOM file ``data`` looks made by xrwatch (its SR or heatmap SC); ``None``
    for any other file. Only the few attributes :mod:`xrwatch.dicom.provenance` reads are
    parsed: what xrwatch writes always has the preamble and ``DICM``."""
    if len(data) < HEAD_BYTES or data[128:132] != b"DICM":
        return None
    import pydicom

    try:
        ds = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=list(provenance.TAGS)
        )
        return provenance.own_output(ds)
    except Exception:  # unreadable here: the decoder reports it as it does for any file
        return None


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or below it (both already resolved)."""
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


class Intake:
    """Prepares candidates for the batches: called by the worker threads (:meth:`prepare`)
    and, for the log lines about incomplete files, by the main loop (:meth:`waiting`)."""

    def __init__(
        self,
        config: ServeConfig,
        incoming: Path,
        ledger: Ledger,
        decoders: Decoders,
        relative: Callable[[Path], str | None],
        stop: threading.Event,
    ) -> None:
        self.config = config
        self.incoming = incoming
        self.ledger = ledger
        self.decoders = decoders
        self._relative = relative
        self._stop = stop
        self._truncated_since: dict[str, float] = {}
        self._incomplete_logged: set[str] = set()  # handled on the main loop's thread only
        # own output left in INCOMING (no archive): its signature, so it is not read again
        self._own_output: dict[str, tuple[int, int, int, int]] = {}

    # -- on the main loop's thread -------------------------------------------------------
    def taken(self, work: Work) -> None:
        """``work`` is going into a batch: its next wait is logged at INFO again."""
        self._incomplete_logged.discard(work.rel)

    def waiting(self, work: Work) -> None:
        """Log that ``work`` (kind ``requeue``) is incomplete: once at INFO, then at DEBUG."""
        if work.error and work.rel not in self._incomplete_logged:
            # once at INFO; the retries every few seconds only at DEBUG
            self._incomplete_logged.add(work.rel)
            logger.info("%s: incomplete (%s); waiting for the rest", work.rel, work.error)
        elif work.error:
            logger.debug("%s: still incomplete (%s)", work.rel, work.error)

    # -- on a worker thread: read, hash, claim, decode -----------------------------------
    def prepare(self, cand: Candidate) -> Work:
        raw = self._relative(cand.path) or cand.path.name
        rel = escape_name(raw)  # the name in the ledger, reports and logs
        if self._stop.is_set():
            return Work(cand, rel, "skip")  # not claimed: the next start picks it up
        parts = tuple(raw.split("/"))
        try:
            dir_fd = open_dir(self.incoming, parts[:-1])
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                logger.warning(
                    "%s: a folder on its path is now a symbolic link (or not a folder); "
                    "it is not followed",
                    rel,
                )
            return Work(cand, rel, "skip")  # the file that was found there is gone
        try:
            return self._prepare_at(cand, rel, parts, dir_fd)
        except _Skip:
            return Work(cand, rel, "skip")
        except _Requeue:
            return Work(cand, rel, "requeue", delay=0.0)
        finally:
            os.close(dir_fd)

    def _prepare_at(self, cand: Candidate, rel: str, parts: tuple[str, ...], dir_fd: int) -> Work:
        name = parts[-1]
        try:
            lst = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            raise _Skip from None  # gone
        if signature(lst) != (cand.size, cand.mtime_ns, cand.ctime_ns, cand.ino):
            raise _Requeue  # changed since it was found complete
        if self._own_output.get(rel) == signature(lst):
            raise _Skip  # xrwatch's own output, already skipped and logged
        fid: FileId | None = FileId.of(lst)  # what an archive move must find at the name
        if stat.S_ISDIR(lst.st_mode):
            if depth("/".join(parts)) <= MAX_DEPTH:
                raise _Skip  # a file replaced by a folder: its files are found on their own
            fid = None  # a folder is reported, never archived
            got = _Read(
                "too-deep",
                f"a folder nested more than {MAX_DEPTH} levels below INCOMING; "
                "its files are not read (move them nearer to INCOMING)",
            )
        elif stat.S_ISLNK(lst.st_mode):
            got = self._read_link(dir_fd, parts)
        else:
            got = self._read_leaf(dir_fd, name, lst)
        done = self.ledger.finished_row(rel, got.identity)
        if done is not None:
            refresh = self.ledger.seen_again(done[0], *signature(lst))
            return Work(
                cand, rel, "done", row_id=done[0], done_state=done[1], parts=parts, fid=fid,
                refresh=refresh,
            )  # fmt: skip
        own = own_output(got.data) if got.data is not None and not got.error else None
        if own is not None:
            if self.config.archive is None:  # left where it is: not read again unchanged
                self._own_output[rel] = signature(lst)
            return Work(
                cand, rel, "own_output", sha256=got.sha256, error=printable(own), parts=parts,
                fid=fid,
            )  # fmt: skip
        self._own_output.pop(rel, None)
        row_id = self.ledger.claim(
            rel, got.identity, got.sha256, cand.size, cand.mtime_ns, cand.seen_at,
            cand.ctime_ns, cand.ino,
        )  # fmt: skip
        if row_id is None:
            return Work(cand, rel, "skip")  # another daemon holds it (or just finished it)

        def failed(reason: str) -> Work:
            # reasons may quote DICOM values: no control characters reach logs or status
            return Work(
                cand, rel, "error", row_id=row_id, sha256=got.sha256, error=printable(reason),
                parts=parts, fid=fid,
            )  # fmt: skip

        if got.error or got.data is None:
            return failed(got.error)
        data = got.data
        try:
            array, meta = self.decoders.decode(cand.path, data)
        except ImageError as exc:
            # Too short to tell what it is (an empty file, a DICOM preamble, a bare PNG
            # signature) is as incomplete as a truncated one: wait for the rest.
            short = too_short_to_identify(data)
            if not isinstance(exc, TruncatedImageError) and not short:
                if self._vanished(dir_fd, name, row_id):
                    raise _Skip from None
                return failed(exc.reason)
            first = self._truncated_since.setdefault(rel, time.monotonic())
            waited = time.monotonic() - first
            if not self.config.once and waited < self.config.truncated_timeout:
                self.ledger.release(row_id)
                delay = min(max(self.config.stable_seconds, 0.5), 10.0)
                why = exc.reason if not short else f"only {len(data)} bytes so far"
                return Work(cand, rel, "requeue", delay=delay, error=printable(why))
            self._truncated_since.pop(rel, None)
            reason = exc.reason
            if not self.config.once:
                reason += f" (still incomplete after {waited:.0f} s)"
            return failed(reason)
        except Exception as exc:  # a reader bug must not stop the daemon
            logger.exception("unexpected error reading %s", rel)
            return failed(f"unexpected error while reading: {type(exc).__name__}: {exc}")
        if self._vanished(dir_fd, name, row_id):
            raise _Skip
        self._truncated_since.pop(rel, None)
        return Work(
            cand, rel, "input", row_id=row_id, sha256=got.sha256, array=array, meta=meta,
            parts=parts, fid=fid,
        )  # fmt: skip

    def _read_link(self, dir_fd: int, parts: tuple[str, ...]) -> _Read:
        """A symbolic link is read only when it leads to a file inside INCOMING, and that
        file is then reached from INCOMING without following links, like any other."""
        try:
            link = os.readlink(parts[-1], dir_fd=dir_fd)
        except OSError:
            raise _Skip from None
        ident = f"symlink:{hashlib.sha256(os.fsencode(link)).hexdigest()}"
        target = Path(os.path.realpath(self.incoming.joinpath(*parts[:-1], link)))
        if not inside(target, self.incoming):
            return _Read(
                ident,
                "symbolic link points outside INCOMING; it was not followed "
                "(copy the file in instead)",
            )
        tparts = target.relative_to(self.incoming).parts
        if not tparts:
            return _Read(ident, "symbolic link points to INCOMING itself, not to a file")
        try:
            tdir = open_dir(self.incoming, tparts[:-1])
            try:
                tst = os.stat(tparts[-1], dir_fd=tdir, follow_symlinks=False)
                return self._read_leaf(tdir, tparts[-1], tst)
            finally:
                os.close(tdir)
        except FileNotFoundError:
            return _Read(ident, "symbolic link points to a file that does not exist")
        except OSError:
            raise _Requeue from None  # its target changed while it was followed

    def _read_leaf(self, dir_fd: int, name: str, lst: os.stat_result) -> _Read:
        """Read the file ``name`` of ``dir_fd`` (found with ``lst``) once, bounded."""
        limit = self.config.max_file_mb << 20
        try:
            fd = open_file(dir_fd, name)
        except FileNotFoundError:
            raise _Skip from None
        except PermissionError:
            return _Read(
                f"unreadable:{lst.st_size}:{lst.st_mtime_ns}",
                "permission denied: the daemon's user cannot read this file",
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Requeue from None  # became a link after it was looked at
            return _Read(
                f"unreadable:{lst.st_size}:{lst.st_mtime_ns}",
                f"cannot read the file: {exc.strerror or exc}",
            )
        try:
            st = os.fstat(fd)
            if not FileId.of(st).same_inode(lst):
                raise _Requeue
            if not stat.S_ISREG(st.st_mode):
                return _Read(
                    f"special:{st.st_mode:o}:{st.st_mtime_ns}",
                    f"{_kind_of(st.st_mode)}, not a regular file; only regular files are read",
                )
            too_large = _Read(
                f"too-large:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}",
                f"file is {st.st_size} bytes, over the {self.config.max_file_mb} MiB limit "
                "(max_file_mb); it was not read",
            )
            if st.st_size > limit:
                return too_large
            try:
                got = read_fd(fd, limit, stop=self._stop.is_set)
            except InputTooLarge:
                raise _Requeue from None  # still growing
            except OSError as exc:
                return _Read(
                    f"unreadable:{st.st_size}:{st.st_mtime_ns}",
                    f"cannot read the file: {exc.strerror or exc}",
                )
            if got is None:
                raise _Skip  # stopping: not claimed, the next start reads it
            data, after = got
            if FileId.of(after) != FileId.of(st) or len(data) != after.st_size:
                # changed while it was read: wait for it again; the bytes read are all that
                # is hashed and decoded, so nothing later can differ
                raise _Requeue
            sha = hashlib.sha256(data).hexdigest()
            return _Read(sha, sha256=sha, data=data)
        finally:
            os.close(fd)

    def _vanished(self, dir_fd: int, name: str, row_id: int) -> bool:
        """Whether the file was removed while it was decoded (then it is not ours to report)."""
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            self.ledger.release(row_id)
            return True
        except OSError:
            pass
        return False
