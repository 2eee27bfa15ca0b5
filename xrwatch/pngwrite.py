"""A minimal PNG encoder for 8-bit RGB arrays: the heatmap overlays' own.

Every row uses filter type 2 ("Up", the difference to the row above; the first row type 0,
"None"), computed for all rows at once with numpy, and the result is deflated by
ISA-L (the ``isal`` package: Intel's Intelligent Storage Acceleration Library, whose
deflate writes the same zlib format several times faster than zlib at its fastest level),
or by the standard :func:`zlib.compress` where ``isal`` cannot be imported (it is a dependency, so
only an install that skipped it, or a platform it does not build on). Both release the
GIL, so several overlays encode in parallel threads. Pillow's encoder picks a filter per
row; on our overlays (256x274 and 224x242) it took about twice as long as zlib at the same
level, for files within 5 % of these. The file holds IHDR, one IDAT and IEND only: no text
or time chunks, nothing but pixels.
"""

from __future__ import annotations

import struct
import types
import zlib

import numpy as np

_deflate: types.ModuleType
try:  # ISA-L's deflate: same format, several times faster (benchmarks/explain.py prints which)
    from isal import isal_zlib as _deflate

    DEFLATE = "isal"
    MAX_LEVEL = 3  # ISA-L's levels are 0-3
except ImportError:  # pragma: no cover - isal is a dependency; this is the platform fallback
    _deflate = zlib
    DEFLATE = "zlib"
    MAX_LEVEL = 9

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_NONE = 0
_FILTER_UP = 2
_COLOUR_RGB = 2  # IHDR colour type: truecolour, 3 samples per pixel


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
    )


def encode_rgb(pixels: np.ndarray, *, level: int = 1) -> bytes:
    """The PNG file of ``pixels`` (uint8, height x width x 3), deflated at ``level`` (1: fast;
    levels above the backend's highest, :data:`MAX_LEVEL`, use that)."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape[:2]:
        raise ValueError(
            f"expected a non-empty uint8 array of shape (height, width, 3), "
            f"got {arr.dtype} {arr.shape}"
        )
    height, width = arr.shape[:2]
    rows = arr.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 0] = _FILTER_NONE
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8: wraps modulo 256 as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_RGB, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", _deflate.compress(filtered.data, min(level, MAX_LEVEL))),
            _chunk(b"IEND", b""),
        )
    )
