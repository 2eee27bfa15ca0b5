"""DICOM reading: modality LUT, VOI LUT, explicit MONOCHROME1 inversion, then [0, 1].

Checks follow torchxrayvision and the field's traps: pydicom's presentation-LUT helper
does not invert MONOCHROME1, a truncated compressed file can parse with zero elements and
only a warning, and ``force=True`` accepts anything, so every step is checked explicitly.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from xrwatch.errors import (
    ImageDecodeError,
    ImageTooLargeError,
    NotARadiographError,
    TruncatedImageError,
    UnsupportedImageError,
)
from xrwatch.imageio.types import DecodedImage, ImageMeta

logger = logging.getLogger(__name__)

# Modalities that are projection radiographs; anything else (CT, MR, US...) is refused.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "RF", "XA", "MG", "PX", "OT", "SC"})
_IMAGE_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _str(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)


def _meta(path: Path, ds: Any, source_mode: str, width: int, height: int) -> ImageMeta:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return ImageMeta(
        path=str(path),
        kind="dicom",
        width=width,
        height=height,
        source_mode=source_mode,
        decoded_width=width,
        decoded_height=height,
        modality=_str(ds, "Modality"),
        photometric=_str(ds, "PhotometricInterpretation"),
        transfer_syntax=str(ts) if ts else None,
        sop_instance_uid=_str(ds, "SOPInstanceUID"),
        study_instance_uid=_str(ds, "StudyInstanceUID"),
        series_instance_uid=_str(ds, "SeriesInstanceUID"),
        accession_number=_str(ds, "AccessionNumber"),
        body_part=_str(ds, "BodyPartExamined"),
        view_position=_str(ds, "ViewPosition"),
    )


def _read_dataset(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, force=True)
        except InvalidDicomError as exc:
            raise UnsupportedImageError(path, f"not a valid DICOM file: {exc}") from None
        except EOFError as exc:
            raise TruncatedImageError(path, f"DICOM file ends early: {exc}") from None
        except Exception as exc:
            raise ImageDecodeError(path, f"DICOM header does not parse: {exc}") from None
    for w in caught:
        logger.debug("%s: pydicom: %s", path, w.message)
    if len(ds) == 0:
        raise TruncatedImageError(path, "DICOM file holds no data elements (truncated or corrupt)")
    return ds


def _expected_native_bytes(ds: Any) -> int:
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    return (rows * cols * spp * frames * bits + 7) // 8


def _apply_voi(arr: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_voi

    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        try:
            return np.asarray(apply_voi(arr, ds, index=0), dtype=np.float64)
        except Exception as exc:  # a malformed window falls back to the data's own range
            logger.warning("ignoring malformed VOI in DICOM: %s", exc)
    # No VOI: robust full-range normalisation (0.5th..99.5th percentile).
    lo, hi = np.percentile(arr, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.float64)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def read_dicom(path: Path, *, max_pixels: int) -> DecodedImage:
    """Read a single-frame projection radiograph into a float32 2-D array in [0, 1]."""
    from pydicom.pixels import apply_modality_lut

    ds = _read_dataset(path)
    if not any(tag in ds for tag in _IMAGE_PIXEL_TAGS):
        sop = _str(ds, "SOPClassUID") or "unknown SOP class"
        name = getattr(ds.get("SOPClassUID"), "name", sop)
        raise UnsupportedImageError(path, f"DICOM has no pixel data (it is a {name}, not an image)")
    modality = (_str(ds, "Modality") or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise NotARadiographError(
            path, f"DICOM modality is {modality}, not a projection radiograph (CR/DX expected)"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, ValueError, TypeError):
        raise ImageDecodeError(path, "DICOM lacks valid Rows/Columns") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnsupportedImageError(
            path, f"multi-frame DICOM ({frames} frames); a single-frame radiograph is expected"
        )
    if rows * cols > max_pixels:
        raise ImageTooLargeError(
            path, f"{cols}x{rows} pixels exceeds the limit of {max_pixels:,}; nothing was decoded"
        )
    photometric = (_str(ds, "PhotometricInterpretation") or "").upper()
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None or not ts.is_compressed:
        raw = ds.get("PixelData")
        if raw is not None and "BitsAllocated" in ds:
            expected = _expected_native_bytes(ds)
            have = len(raw)
            if have < expected:
                raise TruncatedImageError(
                    path, f"pixel data is {have:,} bytes but the header promises {expected:,}"
                )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:
        text = str(exc)
        hint = ""
        if "plugin" in text.lower() or "handler" in text.lower():
            hint = " (install the DICOM pixel plugins: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)"
        raise ImageDecodeError(path, f"DICOM pixel data does not decode: {text}{hint}") from None
    arr = np.asarray(arr)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"):
        arr = _colour_to_luminance(ds, arr, photometric)
        source_mode = f"{photometric} -> luminance"
        out = _normalise_range(arr)
    elif photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise UnsupportedImageError(path, f"expected a 2-D grayscale image, got shape {arr.shape}")
        bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        source_mode = f"{arr.dtype}/{bits_stored}-bit"
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        out = _apply_voi(values, ds)
        if not ("VOILUTSequence" in ds or "WindowCenter" in ds):
            pass
        else:
            out = _normalise_range(out, fixed=_voi_output_range(ds, out))
        if photometric == "MONOCHROME1":
            out = 1.0 - out  # explicit: pydicom's presentation-LUT helper does not do this
    else:
        raise UnsupportedImageError(
            path,
            f"unsupported PhotometricInterpretation {photometric or '(missing)'}; "
            "expected MONOCHROME1, MONOCHROME2 or RGB",
        )
    pixels = np.clip(np.ascontiguousarray(out, dtype=np.float32), 0.0, 1.0)
    return DecodedImage(pixels=pixels, meta=_meta(path, ds, source_mode, cols, rows))


def _voi_output_range(ds: Any, out: np.ndarray) -> tuple[float, float]:
    """The output range of the VOI transform: a window maps to [y_min, y_max] of the data
    type; a VOI LUT to [0, 2**bits - 1]."""
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    return float(out.min()), float(out.max())


def _normalise_range(arr: np.ndarray, fixed: tuple[float, float] | None = None) -> np.ndarray:
    lo, hi = fixed if fixed is not None else (float(arr.min()), float(arr.max()))
    if hi <= lo:
        return np.zeros(arr.shape, np.float64)
    return np.clip((np.asarray(arr, np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _colour_to_luminance(ds: Any, arr: np.ndarray, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif photometric.startswith("YBR") and photometric not in ("YBR_ICT", "YBR_RCT"):
        arr = convert_color_space(arr, photometric, "RGB")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UnsupportedImageError(ds.filename or "?", f"unexpected colour shape {arr.shape}")
    rgb = arr.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
