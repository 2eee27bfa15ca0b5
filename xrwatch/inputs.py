"""Which files in a folder are inputs: folder expansion and the names every part ignores.

``classify``, ``inspect`` and export verification expand folders with
:func:`expand_inputs`; the daemon's watcher skips the same names with :func:`is_ignored`.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Hidden and temporary names that writers use before the final rename, plus DICOMDIR
# (a DICOM media index, not an image).
IGNORE_PATTERNS = (".*", "*.part", "*.tmp", "*.crdownload", "~*", "DICOMDIR")


def is_ignored(rel: str, patterns: Sequence[str] = IGNORE_PATTERNS) -> bool:
    """Whether any component of the '/'-separated relative path matches a pattern."""
    return any(
        fnmatch.fnmatchcase(part, pattern) for part in rel.split("/") for pattern in patterns
    )


def expand_inputs(
    paths: Sequence[str | Path], ignore: Sequence[str] = IGNORE_PATTERNS
) -> list[Path]:
    """Files given directly, plus every file under given folders (recursively, sorted).

    Inside folders, names matching ``ignore`` (hidden, temporary, ``DICOMDIR``; a hidden
    folder hides all it holds) are skipped; a path given directly is always kept, and one
    that does not exist is returned as is so that it is reported as an error, not dropped.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(
                f
                for f in sorted(p.rglob("*"))
                if f.is_file() and not is_ignored(f.relative_to(p).as_posix(), ignore)
            )
        else:
            out.append(p)
    return out
