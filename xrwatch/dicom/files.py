"""The temporary files DICOM writes leave behind when killed: what they are called, and
the sweep that removes them (the writes themselves: :func:`xrwatch.atomic.write_atomic`
with ``suffix=PART_SUFFIX``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

PART_SUFFIX = ".part"  # temporary files are ".<random>.part": hidden, so no watcher takes them


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
