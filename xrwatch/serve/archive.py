"""``--archive DIR``: processed inputs move to ``DIR/processed/…``, failed ones to
``DIR/failed/…``, each keeping its path relative to INCOMING. An existing file is never
overwritten: the new one gets a ``.1``, ``.2``… suffix before its extension."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def archive_destination(archive: Path, rel: str, ok: bool) -> Path:
    """The first free path for ``rel`` under ``archive/processed`` or ``archive/failed``."""
    base = archive / ("processed" if ok else "failed") / rel
    if not os.path.lexists(base):
        return base
    stem, suffix = base.name, ""
    if "." in base.name[1:]:
        cut = base.name.index(".", 1)
        stem, suffix = base.name[:cut], base.name[cut:]
    n = 1
    while True:
        candidate = base.with_name(f"{stem}.{n}{suffix}")
        if not os.path.lexists(candidate):
            return candidate
        n += 1


def move_to_archive(source: Path, archive: Path, rel: str, ok: bool) -> Path:
    """Move ``source`` into the archive (across filesystems too) and return where it went."""
    dest = archive_destination(archive, rel, ok)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        # link + unlink: atomic and never overwrites (link fails if dest appeared meanwhile)
        os.link(source, dest, follow_symlinks=False)
        os.unlink(source)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EEXIST):
            raise
        if exc.errno == errno.EEXIST:
            return move_to_archive(source, archive, rel, ok)
        shutil.move(str(source), str(dest))
    return dest
