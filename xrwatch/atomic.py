"""Writing files so that a reader sees the old content or the new, never a part.

One definition for every report, heatmap and sidecar the daemon and the CLI write:
a temporary file beside the target, fsynced, then renamed over it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_file(path: Path, *, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` (fsynced) when the block ends without error.

    The temporary file is hidden (``.``-prefixed) in ``path``'s folder, so a watcher that skips
    hidden names never sees it; it is removed when the block raises.
    """
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
