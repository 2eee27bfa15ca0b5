"""Durable file writes: a hidden temporary file, fsync, rename, fsync of the folder."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from xrwatch.atomic import fsync_dir, make_dirs

PART_SUFFIX = ".part"  # with a leading dot: the watcher ignores both


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that, once this returns, it survives a power cut, and
    a reader never sees it partly written."""
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PART_SUFFIX}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def remove_stale_parts(root: Path) -> int:
    """Delete temporary files a killed writer left under ``root``; return how many."""
    n = 0
    if not root.is_dir():
        return 0
    for tmp in root.rglob(f".*{PART_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            n += 1
    return n
