"""The DICOM grayscale LUT arithmetic, written out by hand: modality LUT, then VOI to [0, 1].

pydicom's helpers scale to the output data type, leave MONOCHROME1 alone and trip over
LUT bit depths other than 8 or 16; these functions map straight to [0, 1] so the rest of
xrwatch never sees a bit depth.

* :func:`apply_modality_lut` - Modality LUT Sequence, else RescaleSlope/RescaleIntercept.
* :func:`apply_window` - DICOM PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID).
* :func:`apply_voi_lut` - a VOI LUT Sequence item, scaled by its LUTDescriptor bit depth.
* :func:`robust_normalise` - no VOI in the file: a percentile window over the data.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
ROBUST_PERCENTILES = (
    0.5,
    99.5,
)  # clip the 0.5 % darkest and brightest pixels (markers, collimation)


class VOIError(ValueError):
    """The VOI attributes of a dataset are present but unusable (bad width, bad LUT)."""


def apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Window ``values`` (modality-LUT output) to [0, 1] per PS3.3 C.11.2.1.2."""
    x = np.asarray(values, dtype=np.float64)
    function = function.upper() or "LINEAR"
    if function == "LINEAR":
        if width < 1:
            raise VOIError(f"LINEAR window width must be >= 1, found {width}")
        # C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> ymin; x > c - 0.5 + (w-1)/2 -> ymax;
        # else ((x - (c - 0.5)) / (w - 1) + 0.5). A width of 1 is a pure threshold.
        if width == 1:
            return (x > center - 0.5).astype(np.float64)
        return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise VOIError(f"LINEAR_EXACT window width must be > 0, found {width}")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        if width <= 0:
            raise VOIError(f"SIGMOID window width must be > 0, found {width}")
        z = np.clip(-4.0 * (x - center) / width, -700.0, 700.0)  # no overflow in exp
        return 1.0 / (1.0 + np.exp(z))
    raise VOIError(f"unknown VOI LUT Function {function!r}; expected one of {VOI_FUNCTIONS}")


def _lut_values(item: Any, entries: int, bits: int) -> np.ndarray:
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        dtype = "<u1" if bits <= 8 and len(raw) == entries else "<u2"
        lut = np.frombuffer(bytes(raw), dtype=dtype)
    elif isinstance(raw, (int, float)):
        lut = np.asarray([raw])
    else:
        lut = np.asarray(list(raw))
    return lut.astype(np.float64)


def apply_voi_lut(values: np.ndarray, item: Any, *, signed: bool) -> np.ndarray:
    """Map ``values`` through one VOI LUT Sequence item to [0, 1].

    LUTDescriptor = (entries, first mapped value, bits per entry); 0 entries means 65536.
    Inputs below the first mapped value take the first entry, above the last the last
    entry. Output is divided by ``2**bits - 1`` (the descriptor's bit depth).
    """
    entries, first, bits = _descriptor(item, signed=signed)
    if not 1 <= bits <= 16:
        raise VOIError(f"VOI LUT bit depth must be 1..16, found {bits}")
    try:
        lut = _lut_values(item, entries, bits)
    except AttributeError:
        raise VOIError("VOI LUT has no LUTData") from None
    if lut.size == 0:
        raise VOIError("VOI LUT has no entries")
    if lut.size != entries:
        logger.debug("VOI LUT holds %d entries, descriptor says %d", lut.size, entries)
    top = float(2**bits - 1)
    if float(lut.max()) > top:  # descriptor lies about its depth: trust the data
        real_bits = int(lut.max()).bit_length()
        logger.warning(
            "VOI LUT values exceed its %d-bit descriptor; using %d bits", bits, real_bits
        )
        top = float(2**real_bits - 1)
    return _lut_lookup(values, lut, first) / top


def _lut_lookup(values: np.ndarray, lut: np.ndarray, first: int) -> np.ndarray:
    index = np.clip(np.rint(np.asarray(values, np.float64)) - first, 0, lut.size - 1)
    return lut[index.astype(np.intp)]


def _descriptor(item: Any, *, signed: bool) -> tuple[int, int, int]:
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
    except (AttributeError, TypeError, ValueError) as exc:
        raise VOIError(f"LUT has no valid LUTDescriptor: {exc}") from None
    if signed and first >= 1 << 15:  # stored as US, meant as SS
        first -= 1 << 16
    return entries or 65536, first, bits


def apply_modality_lut(pixels: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values -> modality values (float64): the LUT sequence if present, else rescale."""
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence) > 0:
        item = ds.ModalityLUTSequence[0]
        entries, first, bits = _descriptor(item, signed=signed)
        lut = _lut_values(item, entries, bits)
        if lut.size == 0:
            raise VOIError("Modality LUT has no entries")
        return _lut_lookup(pixels, lut, first)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    values = np.asarray(pixels, dtype=np.float64)
    if slope != 1.0:
        values = values * slope
    if intercept != 0.0:
        values = values + intercept
    return values


def robust_normalise(values: np.ndarray) -> np.ndarray:
    """Stretch the 0.5th..99.5th percentile of ``values`` to [0, 1] (the no-VOI fallback)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x
    step = max(
        1, int(np.sqrt(x.size / 1_000_000))
    )  # percentiles from <= ~1 MP: same answer, faster
    lo, hi = (float(v) for v in np.percentile(x[::step, ::step], ROBUST_PERCENTILES))
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, np.float64)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)
