"""Turning the bytes of a DICOM, PNG or JPEG file into a float32 2-D array in [0, 1].

One entry point, :func:`read_image`. The format is detected from the bytes (never the
extension); each format has a small reader module (:mod:`.dicom`, :mod:`.raster`).
Bright = dense tissue, as a radiologist views the image.
"""

from __future__ import annotations

import logging
from pathlib import Path

from xrwatch.errors import UnsupportedImageError
from xrwatch.imageio.detect import sniff_format
from xrwatch.imageio.types import MAX_PIXELS, DecodedImage, ImageMeta

logger = logging.getLogger(__name__)

__all__ = ["MAX_PIXELS", "DecodedImage", "ImageMeta", "read_image", "sniff_format"]


def read_image(
    path: str | Path,
    *,
    min_side: int | None = None,
    max_pixels: int = MAX_PIXELS,
    data: bytes | None = None,
) -> DecodedImage:
    """Decode ``path`` to a float32 2-D array in [0, 1] plus report metadata.

    ``min_side`` is a hint: the caller needs no more than this many pixels on the shorter
    side, so a large JPEG may be decoded at reduced scale (Pillow draft mode), and a large
    JPEG 2000 DICOM frame at reduced resolution (OpenJPEG's reduce).
    ``max_pixels`` refuses images larger than this before their pixels are allocated.
    ``data``: the file's bytes when the caller already read them (to hash them, see
    :func:`xrwatch.filehash.read_and_hash`); the file is then not read again, and ``path``
    only names it.
    Raises a subclass of :class:`xrwatch.errors.ImageError` naming the file.
    """
    p = Path(path)
    kind = sniff_format(p, head=data)
    if kind == "dicom":
        from xrwatch.imageio import dicom

        return dicom.read_dicom(p, max_pixels=max_pixels, data=data, min_side=min_side)
    if kind in ("png", "jpeg"):
        from xrwatch.imageio import raster

        return raster.read_raster(p, kind=kind, min_side=min_side, max_pixels=max_pixels, data=data)
    raise UnsupportedImageError(p, f"unsupported format {kind!r}")  # pragma: no cover
