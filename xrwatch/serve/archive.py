"""``--archive DIR``: processed inputs move to ``DIR/processed/…``, failed ones to
``DIR/failed/…``, each keeping its path relative to INCOMING. An existing file is never
overwritten: the new one gets a ``.1``, ``.2``… suffix before its extension. Only the
inode that was classified is moved (:func:`xrwatch.safefs.move_verified`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from xrwatch.safefs import FileId, move_verified

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


def move_to_archive(
    incoming: Path, parts: Sequence[str], expected: FileId, archive: Path, rel: str, ok: bool
) -> Path | None:
    """Move ``incoming/parts`` into the archive (across filesystems too) and return where it
    went; None when the name no longer holds the inode ``expected`` (left for processing).
    ``rel`` is the escaped name (:mod:`xrwatch.serve.names`) the archive path keeps."""
    return move_verified(incoming, parts, expected, lambda: archive_destination(archive, rel, ok))
