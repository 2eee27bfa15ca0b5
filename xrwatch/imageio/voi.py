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
import math
from collections.abc import Callable
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
    return _rescale(pixels, slope, intercept)


def _rescale(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """``pixels * slope + intercept`` in float64 (steps that change nothing are skipped)."""
    values = np.asarray(pixels, dtype=np.float64)
    if slope != 1.0:
        values = values * slope
    if intercept != 0.0:
        values = values + intercept
    return values


def _sample_step(size: int) -> int:
    """Every step-th row and column: percentiles from <= ~1 MP, the same answer, faster."""
    return max(1, math.ceil(math.sqrt(size / 1_000_000)))


def robust_normalise(values: np.ndarray) -> np.ndarray:
    """Stretch the 0.5th..99.5th percentile of ``values`` to [0, 1] (the no-VOI fallback)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x
    step = _sample_step(x.size)
    lo, hi = (float(v) for v in np.percentile(x[::step, ::step], ROBUST_PERCENTILES))
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, np.float64)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


# --- the fast path: what read_image uses ------------------------------------------------
#
# The functions above are the reference arithmetic (float64, one step at a time). The path
# below gives the same result within float32 rounding, in a fraction of the time:
# * rescale + LINEAR/LINEAR_EXACT window (or the robust stretch) + inversion is one affine
#   map, applied in float32 in place;
# * anything else on <= 16-bit integer pixels (SIGMOID, LUT sequences) is evaluated once per
#   possible stored value, in float64, and looked up;
# * percentiles of integer pixels come from a histogram of the stored values (exact).


def _table_index(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(index, domain)`` with ``domain[index] == stored`` for <= 16-bit integers, else None."""
    if stored.dtype.kind not in "ui" or stored.dtype.itemsize > 2 or stored.size == 0:
        return None
    if stored.dtype.kind == "u":
        top = int(stored.max()) + 1
        return stored, np.arange(top, dtype=np.int64)
    unsigned = np.dtype(f"u{stored.dtype.itemsize}")
    domain = np.arange(1 << (8 * stored.dtype.itemsize), dtype=unsigned).view(stored.dtype)
    return stored.view(unsigned), domain.astype(np.int64)


def _percentiles_from_counts(
    values: np.ndarray, counts: np.ndarray, qs: tuple[float, ...]
) -> list[float]:
    """np.percentile (linear) of a sample given as value -> count, without expanding it."""
    used = counts > 0
    v, c = values[used], counts[used]
    order = np.argsort(v, kind="stable")
    v, cum = v[order], np.cumsum(c[order])
    n = int(cum[-1])
    out = []
    for q in qs:
        pos = (n - 1) * q / 100.0
        k = math.floor(pos)
        a = float(v[np.searchsorted(cum, k + 1)])  # k-th order statistic (0-based)
        b = float(v[np.searchsorted(cum, min(k + 2, n))])
        out.append(a + (pos - k) * (b - a))
    return out


def _sample(stored: np.ndarray) -> np.ndarray:
    step = _sample_step(stored.size)  # as robust_normalise samples
    return stored[::step, ::step] if stored.ndim == 2 else stored


def robust_range(
    stored: np.ndarray, to_modality: Callable[[np.ndarray], np.ndarray]
) -> tuple[float, float]:
    """robust_normalise's (lo, hi) for ``to_modality(stored)``, from a histogram if integer."""
    indexed = _table_index(stored)
    if indexed is None:
        x = to_modality(np.asarray(_sample(stored), np.float64))
        lo, hi = (float(v) for v in np.percentile(x, ROBUST_PERCENTILES))
        if hi <= lo:
            full = to_modality(np.asarray(stored, np.float64))
            lo, hi = float(full.min()), float(full.max())
        return lo, hi
    index, domain = indexed
    table = to_modality(domain)
    sample = _sample(index)
    counts = np.bincount(sample.ravel(), minlength=domain.size)
    lo, hi = _percentiles_from_counts(table, counts, ROBUST_PERCENTILES)
    if hi <= lo:
        present = np.bincount(index.ravel(), minlength=domain.size) > 0
        lo, hi = float(table[present].min()), float(table[present].max())
    return lo, hi


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise VOIError(f"{name} is {value}, not a finite number")
    return value


def grayscale_to_unit(
    stored: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    modality_lut: Any = None,
    voi_lut: Any = None,
    window: tuple[float, float, str] | None = None,
    signed: bool = False,
    invert: bool = False,
    label: str = "",
) -> np.ndarray:
    """Stored grayscale values -> float32 in [0, 1]: modality LUT, VOI, optional inversion.

    ``modality_lut``/``voi_lut``: a LUT Sequence item (preferred over ``slope``/``intercept``
    and ``window``, as pydicom does). ``window``: ``(center, width, function)``. A VOI that
    cannot be used is logged (naming ``label``) and replaced by the robust stretch.
    Raises :class:`VOIError` when the modality stage cannot be applied or overflows.
    """
    stored = np.asarray(stored)
    _finite("RescaleSlope", slope)
    _finite("RescaleIntercept", intercept)
    lut_entries: tuple[np.ndarray, int] | None = None
    if modality_lut is not None:
        entries, first, bits = _descriptor(modality_lut, signed=signed)
        lut = _lut_values(modality_lut, entries, bits)
        if lut.size == 0:
            raise VOIError("Modality LUT has no entries")
        lut_entries = (lut, first)

    def to_modality(x: np.ndarray) -> np.ndarray:
        if lut_entries is not None:
            return _lut_lookup(x, *lut_entries)
        return _rescale(x, slope, intercept)

    affine = _affine(stored, window, voi_lut, lut_entries, slope, intercept, to_modality, label)
    if affine is not None:
        scale, offset = affine
        if invert:
            scale, offset = -scale, 1.0 - offset
        if not (math.isfinite(scale) and math.isfinite(offset)) or abs(scale) > 1e30:
            raise VOIError(
                f"rescale/window give a non-finite mapping (scale {scale}, offset {offset})"
            )
        out = stored.astype(np.float32)  # then in place: faster than a mixed-type ufunc
        out *= np.float32(scale)
        out += np.float32(offset)
        return np.clip(out, 0.0, 1.0, out=out)  # NaN in float pixel data stays NaN

    def to_unit(x: np.ndarray, data: np.ndarray) -> np.ndarray:
        values = to_modality(x)
        if not np.isfinite(values).all():
            raise VOIError("modality LUT/rescale gives non-finite values")
        y = _voi_or_robust(values, data, window, voi_lut, signed, to_modality, label)
        return 1.0 - y if invert else y

    indexed = _table_index(stored)
    if indexed is None:
        return np.clip(np.asarray(to_unit(stored, stored), dtype=np.float32), 0.0, 1.0)
    index, domain = indexed
    table = np.asarray(np.clip(to_unit(domain, stored), 0.0, 1.0), dtype=np.float32)
    return np.take(table, index)


def _affine(
    stored: np.ndarray,
    window: tuple[float, float, str] | None,
    voi_lut: Any,
    lut_entries: tuple[np.ndarray, int] | None,
    slope: float,
    intercept: float,
    to_modality: Callable[[np.ndarray], np.ndarray],
    label: str,
) -> tuple[float, float] | None:
    """``(scale, offset)`` when stored -> [0, 1] is one affine map (then clipped), else None."""
    if voi_lut is not None or lut_entries is not None or stored.dtype.kind not in "uif":
        return None
    if window is not None:
        center, width, function = window
        function = function.upper() or "LINEAR"
        if function == "LINEAR" and width > 1:
            k = 1.0 / (width - 1)
            return slope * k, (intercept - (center - 0.5)) * k + 0.5
        if function == "LINEAR_EXACT" and width > 0:
            return slope / width, (intercept - center) / width + 0.5
        try:
            apply_window(np.zeros(1), center, width, function)
        except VOIError as exc:  # unusable: the robust stretch below, as _voi_or_robust does
            logger.warning(
                "%s: ignoring unusable VOI (%s); normalising by the data range", label, exc
            )
        else:
            return None  # a threshold (LINEAR, width 1) or SIGMOID: not affine
    lo, hi = robust_range(stored, to_modality)
    if hi <= lo:
        return 0.0, 0.0
    k = 1.0 / (hi - lo)
    return slope * k, (intercept - lo) * k


def _voi_or_robust(
    values: np.ndarray,
    data: np.ndarray,
    window: tuple[float, float, str] | None,
    voi_lut: Any,
    signed: bool,
    to_modality: Callable[[np.ndarray], np.ndarray],
    label: str,
) -> np.ndarray:
    """VOI LUT item, else window, else the robust stretch over ``data``'s modality values."""
    try:
        if voi_lut is not None:
            return apply_voi_lut(values, voi_lut, signed=signed)
        if window is not None:
            return apply_window(values, *window)
    except (VOIError, TypeError, ValueError, IndexError) as exc:
        logger.warning("%s: ignoring unusable VOI (%s); normalising by the data range", label, exc)
    lo, hi = robust_range(data, to_modality)
    if hi <= lo:
        return np.zeros(values.shape, np.float64)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)
