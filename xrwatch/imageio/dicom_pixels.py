"""DICOM pixel data to a grey image: decoding one frame, then mapping it into [0, 1].

:mod:`.dicom` has read and checked the dataset (size, completeness, transfer syntax) and
reserved the decode memory; this module turns its pixel data into float32 pixels:

- decoding: pydicom's decoders (pylibjpeg plugins for JPEG, JPEG-LS, JPEG 2000); pydicom
  sign-extends signed data and masks bits above BitsStored. A large JPEG 2000 frame is
  decoded at reduced resolution (OpenJPEG through Pillow) when the caller needs far fewer
  pixels (``min_side``); plain little-endian grayscale data is viewed without a copy;
- grayscale: modality LUT (rescale or LUT sequence) -> VOI (:mod:`.voi`) -> inversion
  (MONOCHROME1, or Presentation LUT Shape INVERSE). Non-finite rescale/window values are
  an error;
- colour (RGB, YBR, palette): ITU-R 601 luminance over the sample bit depth.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from xrwatch.errors import ImageDecodeError, UnsupportedImageError
from xrwatch.imageio.codestream import FrameSize, patch_jpeg_scan_end
from xrwatch.imageio.voi import VOIError, grayscale_to_unit

logger = logging.getLogger(__name__)

_PLUGIN_HINT = (
    "install the DICOM pixel plugins: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
)
_SEQUENTIAL_JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
# JPEG 2000 is decoded at reduced resolution only when this saves at least one level.
REDUCE_MIN_FACTOR = 2


def reduce_levels(size: FrameSize | None, min_side: int | None) -> int:
    """How many JPEG 2000 resolution levels can be skipped with the shorter side >= min_side."""
    if size is None or min_side is None or min_side <= 0 or not size.levels:
        return 0
    if size.components != 1 or size.signed or size.precision > 16:
        return 0  # Pillow's JPEG 2000 reader, which can reduce, maps these differently
    short = min(size.width, size.height)
    if short < REDUCE_MIN_FACTOR * min_side:
        return 0
    levels = 0
    while levels < size.levels and math.ceil(short / (2 ** (levels + 1))) >= min_side:
        levels += 1
    return levels


def decode_j2k_reduced(path: Path, frame: bytes, size: FrameSize, levels: int) -> np.ndarray | None:
    """OpenJPEG (through Pillow) decoding only the lower resolution levels; None on failure."""
    from PIL import Image

    power = 1 << levels
    width, height = math.ceil(size.width / power), math.ceil(size.height / power)
    try:
        with Image.open(io.BytesIO(frame)) as img:
            # Pillow rounds the reduced size to nearest; OpenJPEG's is the ceiling. Give
            # Pillow the size whose rounding is that ceiling.
            img._size = (width * power - (power >> 1), height * power - (power >> 1))
            img.reduce = levels  # type: ignore[assignment]
            img.load()
            arr = np.asarray(img)
    except Exception as exc:
        logger.debug("%s: reduced JPEG 2000 decode failed (%s); decoding in full", path, exc)
        return None
    if arr.shape != (height, width):
        logger.debug("%s: reduced JPEG 2000 decode gave %s; decoding in full", path, arr.shape)
        return None
    if arr.dtype == np.uint16 and size.precision < 16:
        arr = arr >> (16 - size.precision)  # Pillow scales samples to 16 bits
    return _centre_reduced(arr, levels, (size.height, size.width))


def _centre_reduced(arr: np.ndarray, levels: int, full: tuple[int, int]) -> np.ndarray:
    """Resample the reduced image so its samples evenly cover the full image, block-centred.

    After ``levels`` wavelet levels, sample n lies at full-resolution position
    ``n * 2**levels``, not at the centre of the block it stands for (where an area resize, or
    JPEG's DCT scaling, puts it), and the last sample covers a partial block when a side is
    not a multiple of ``2**levels``. Left alone, both shift every edge of the model input by
    up to ~0.4 reduced pixels. Output sample j of n is taken (linear interpolation, edges
    replicated) at full-resolution position ``(j + 0.5) * side / n - 0.5``; float32 out.
    """
    out = arr.astype(np.float32)
    power = float(1 << levels)
    for axis, side in enumerate(full):
        n = out.shape[axis]
        pos = ((np.arange(n) + 0.5) * (side / n) - 0.5) / power
        pos = np.clip(pos, 0.0, n - 1.0)
        lower = np.floor(pos).astype(np.intp)
        upper = np.minimum(lower + 1, n - 1)
        shape = [1, 1]
        shape[axis] = n
        frac = (pos - lower).astype(np.float32).reshape(shape)
        out = np.take(out, lower, axis=axis) * (1 - frac) + np.take(out, upper, axis=axis) * frac
    return out


def decode_frame(path: Path, ds: Any, ts: str, frame: bytes | None) -> tuple[np.ndarray, str]:
    """Decode the single frame; return ``(array, photometric after decoding)``."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImageDecodeError(
            path, f"no decoder exists for transfer syntax {ts}; {_PLUGIN_HINT}"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "none listed"
        raise ImageDecodeError(
            path,
            f"no installed plugin decodes {decoder.UID.name} (missing: {missing}); {_PLUGIN_HINT}",
        )
    if ts in _SEQUENTIAL_JPEG and frame is not None:
        patched = patch_jpeg_scan_end(frame)
        if patched is not None:
            from pydicom.encaps import encapsulate

            logger.debug("%s: JPEG scan header ends with Se = 0; decoding it as 63", path)
            ds.PixelData = encapsulate([patched])
    try:
        options: dict[str, Any] = {"as_rgb": True}  # YBR -> RGB while decoding
        arr, info = decoder.as_array(ds, index=0, **options)
    except Exception as exc:
        text = " ".join(str(exc).split())  # plugin errors span several lines
        raise ImageDecodeError(path, f"DICOM pixel data does not decode: {text}") from None
    photometric = str(info.get("photometric_interpretation", ds.PhotometricInterpretation))
    return np.asarray(arr), photometric.upper()


_LITTLE_ENDIAN_NATIVE = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}
)


def native_view(ds: Any, ts: str, rows: int, cols: int) -> np.ndarray | None:
    """The stored values of plain little-endian grayscale data, without a copy; else None.

    What pydicom's native decoder would return (it copies, then masks the bits above
    BitsStored): 8/16-bit, one sample, unsigned (masked here only when a value needs it) or
    signed with BitsStored = BitsAllocated. Anything else goes through pydicom.
    """
    if ts not in _LITTLE_ENDIAN_NATIVE or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    raw = ds.get("PixelData")
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", allocated) or allocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if not isinstance(raw, bytes) or allocated not in (8, 16) or not 1 <= stored <= allocated:
        return None
    if signed and stored != allocated:
        return None  # needs sign extension: pydicom does it
    if len(raw) < rows * cols * (allocated // 8):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    arr = np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if not signed and stored < allocated and int(arr.max()) >> stored:
        arr = arr & np.asarray((1 << stored) - 1, dtype=dtype)  # overlay/garbage bits
    return arr


def _finite_value(path: Path, ds: Any, keyword: str, default: float) -> float:
    """A numeric attribute (first value if multi-valued), refused when NaN or infinite."""
    raw = ds.get(keyword)
    if raw is None or raw == "":
        return default
    value = _first(raw)
    if not math.isfinite(value):
        raise ImageDecodeError(
            path, f"DICOM {keyword} is {value}, not a finite number; the image cannot be scaled"
        )
    return value


def _inverted(ds: Any, photometric: str) -> bool:
    """Whether low values are bright: MONOCHROME1, or MONOCHROME2 with a Presentation LUT
    Shape of INVERSE (PS3.3 C.11.6). MONOCHROME1 with INVERSE is the usual DX encoding of the
    same polarity (C.8.11.6.1.2), inverted once."""
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def grey_from_monochrome(path: Path, ds: Any, arr: np.ndarray, photometric: str) -> np.ndarray:
    if arr.ndim != 2:
        raise UnsupportedImageError(
            path, f"expected one 2-D grayscale frame, decoded an array of shape {arr.shape}"
        )
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    modality_lut = None
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence) > 0:
        modality_lut = ds.ModalityLUTSequence[0]
        slope, intercept = 1.0, 0.0
    else:
        slope = _finite_value(path, ds, "RescaleSlope", 1.0) or 1.0
        intercept = _finite_value(path, ds, "RescaleIntercept", 0.0)
    voi_lut, window = None, None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        voi_lut = ds.VOILUTSequence[0]
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center = _finite_value(path, ds, "WindowCenter", math.nan)
            width = _finite_value(path, ds, "WindowWidth", math.nan)
        except (TypeError, ValueError, IndexError) as exc:  # not a number at all
            center = width = math.nan
            logger.warning(
                "%s: ignoring unusable VOI (%s); normalising by the data range", path, exc
            )
        function = str(ds.get("VOILUTFunction", "") or "LINEAR")
        if not (math.isnan(center) or math.isnan(width)):
            window = (center, width, function)
    try:
        return grayscale_to_unit(
            arr,
            slope=slope,
            intercept=intercept,
            modality_lut=modality_lut,
            voi_lut=voi_lut,
            window=window,
            signed=signed,
            invert=_inverted(ds, photometric),
            label=str(path),
        )
    except (VOIError, TypeError, ValueError) as exc:
        raise ImageDecodeError(path, f"modality LUT cannot be applied: {exc}") from None


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def grey_from_colour(path: Path, ds: Any, arr: np.ndarray, photometric: str) -> np.ndarray:
    """ITU-R 601 luminance of a colour image, scaled by its sample bit depth."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception as exc:
            raise ImageDecodeError(path, f"palette colour lookup failed: {exc}") from None
    elif photometric in ("YBR_FULL", "YBR_FULL_422"):  # the decoder left it as YBR
        arr = convert_color_space(arr, photometric, "RGB")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UnsupportedImageError(
            path, f"expected one colour frame (rows, columns, 3), decoded shape {arr.shape}"
        )
    rgb = arr.astype(np.float32)
    luminance = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return np.clip(luminance / np.float32(2**bits - 1), 0.0, 1.0)
