"""PNG and JPEG reading with Pillow: grayscale 8/16-bit, RGB(A), palette, EXIF orientation."""

from __future__ import annotations

import io
import logging
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from xrwatch.errors import (
    ImageDecodeError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedImageError,
)
from xrwatch.imageio.budget import DECODE_BUDGET, estimate_decode_bytes
from xrwatch.imageio.types import DecodedImage, ImageKind, ImageMeta

logger = logging.getLogger(__name__)

# Never let Pillow silently pad a truncated file with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Draft mode only pays when the source is at least this many times the needed side.
DRAFT_MIN_FACTOR = 2


def _scaled_u8(img: Image.Image) -> np.ndarray:
    out = np.asarray(img).astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    return out


def _stretched(arr: np.ndarray) -> np.ndarray:
    out = arr.astype(np.float32)
    lo, hi = float(out.min()), float(out.max())
    if hi <= lo:
        return np.zeros(out.shape, np.float32)
    out -= lo
    out *= np.float32(1.0 / (hi - lo))
    return np.minimum(out, 1.0, out=out)  # rounding must not step past 1


def _to_unit_float(img: Image.Image, path: Path) -> np.ndarray:
    """Pixels in [0, 1]: 8-bit by /255, 16-bit and float by their real (min..max) range."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _stretched(np.asarray(img))
    if mode == "L":
        return _scaled_u8(img)
    if mode == "1":
        return _scaled_u8(img.convert("L"))
    if mode in ("LA", "La"):
        return _scaled_u8(img.getchannel("L"))
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
        mode = img.mode
    if mode in ("RGBA", "RGBa"):
        img = img.convert("RGB")  # alpha ignored: X-rays have no meaningful transparency
        mode = "RGB"
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        return _scaled_u8(img.convert("L"))  # ITU-R 601-2 luma
    raise UnsupportedImageError(path, f"unsupported pixel mode {mode!r}")


def read_raster(
    path: Path,
    *,
    kind: ImageKind,
    min_side: int | None,
    max_pixels: int,
    data: bytes | None = None,
) -> DecodedImage:
    """Read a PNG or JPEG file into a float32 2-D array in [0, 1].

    ``data``: the file's bytes when the caller already holds them (``path`` then only
    names the file).
    """
    source: Path | io.BytesIO = path if data is None else io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # Pillow's own warning fires at ~89 MP; xrwatch applies its documented limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            path, f"refused as a decompression bomb before decoding (Pillow: {exc})"
        ) from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot be opened as {kind.upper()}: {exc}") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                path,
                f"{width}x{height} = {width * height:,} pixels exceeds the limit of "
                f"{max_pixels:,} (decompression-bomb guard); nothing was decoded",
            )
        source_mode = img.mode
        if (
            kind == "jpeg"
            and min_side is not None
            and min(width, height) >= DRAFT_MIN_FACTOR * min_side
        ):
            # JPEG DCT scaling: libjpeg decodes at 1/2, 1/4 or 1/8, the smallest scale
            # whose result still covers the requested size (shorter side >= min_side).
            scale = min(width, height) / min_side
            img.draft(img.mode, (math.ceil(width / scale), math.ceil(height / scale)))
        sample_bytes = 4 if img.mode in ("I", "F") else 2 if "16" in img.mode else 1
        need = estimate_decode_bytes(img.size[0] * img.size[1], sample_bytes, len(img.getbands()))
        what = kind.upper()
        with DECODE_BUDGET.reserve(need):  # shared with DICOM decodes in other threads
            try:
                img.load()
            except OSError as exc:
                msg = str(exc)
                if "truncated" in msg.lower() or "premature" in msg.lower():
                    raise TruncatedImageError(path, f"truncated {what} data: {msg}") from None
                raise ImageDecodeError(path, f"{what} data does not decode: {msg}") from None
            except Exception as exc:  # zlib.error, SyntaxError (bad CRC), ValueError ...
                raise ImageDecodeError(path, f"{what} data does not decode: {exc}") from None
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception as exc:  # malformed EXIF must not stop the image
                logger.warning("%s: ignoring malformed EXIF orientation: %s", path, exc)
                oriented = img
            if oriented is not img and oriented.size != img.size:
                width, height = height, width
            pixels = _to_unit_float(oriented, path)
    pixels = np.ascontiguousarray(pixels)  # already float32 in [0, 1]
    meta = ImageMeta(
        path=str(path),
        kind=kind,
        width=width,
        height=height,
        source_mode=source_mode,
        decoded_width=int(pixels.shape[1]),
        decoded_height=int(pixels.shape[0]),
    )
    return DecodedImage(pixels=pixels, meta=meta)
