"""sha256 of files, and reading a file once for both its hash and its decoding."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
# Files up to this size are read into memory once, hashed, and decoded from those bytes.
# A chest radiograph is far smaller (100 MP at 16 bits, the pixel limit, is 200 MB); a
# larger file is hashed in chunks instead and left to the reader to refuse, so a junk
# file dropped into a watched folder cannot take that much memory.
IN_MEMORY_MAX = 256 << 20


def file_sha256(path: str | Path, chunk_size: int = CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_and_hash(path: str | Path, max_bytes: int = IN_MEMORY_MAX) -> tuple[str, bytes | None]:
    """``(sha256, bytes)`` of a file read once; bytes is None when the file is over
    ``max_bytes`` (then it was hashed in chunks). Raises ``OSError`` as ``open`` does.
    """
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size > max_bytes:
            digest = hashlib.sha256()
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
            return digest.hexdigest(), None
        data = fh.read()
    return hashlib.sha256(data).hexdigest(), data
