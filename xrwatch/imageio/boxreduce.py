"""Integer box reduction of stored pixel values: native DICOM data at reduced resolution.

JPEG is decoded at reduced scale by libjpeg (draft mode) and JPEG 2000 by OpenJPEG (reduce);
plain (native) DICOM pixel data has no such decoder option, so when the caller needs far
fewer pixels than the file holds (``read_image(min_side=...)``, as serving asks), each
``factor`` x ``factor`` block of *stored* values is averaged (rounded to the nearest integer)
before the modality and VOI LUTs run. The LUT arithmetic then touches ``factor**2`` times
fewer pixels, which is where a full-resolution read spends most of its time.

Averaging stored values before the LUTs is what JPEG 2000's reduce does too (its low-pass
band is a filtered image of the stored values). The rows and columns that do not fill a
block (fewer than ``factor``) are dropped, half from each edge, so the image stays centred.
"""

from __future__ import annotations

import numpy as np

# Reduce only when at least this factor is possible (as JPEG draft mode and J2K reduce).
BOX_MIN_FACTOR = 2
# ... and only for images this large: the block sums are one more pass over the stored
# values, which on a 1 MP 8-bit image costs as much as the LUT pass it saves
# (benchmarks/decode.py: the 1024 x 1024 NIH DX read slower with the reduction).
BOX_MIN_PIXELS = 2_000_000


def box_factor(rows: int, cols: int, min_side: int | None) -> int:
    """The largest integer factor keeping the shorter side >= ``min_side``; 1 = no reduction."""
    if min_side is None or min_side <= 0 or rows * cols < BOX_MIN_PIXELS:
        return 1
    factor = min(rows, cols) // min_side
    return factor if factor >= BOX_MIN_FACTOR else 1


def _accumulator(low: int, high: int, count: int) -> np.dtype:
    """The narrowest integer type that holds the sum of ``count`` values in [low, high]."""
    for candidate in (np.uint16, np.int16, np.uint32, np.int32, np.int64):
        wide = np.iinfo(candidate)
        if low * count >= wide.min and high * count <= wide.max:
            return np.dtype(candidate)
    raise ValueError(f"{count} values in [{low}, {high}] do not fit a 64-bit sum")


def box_reduce(stored: np.ndarray, factor: int, *, bits: int | None = None) -> np.ndarray:
    """Mean of each ``factor`` x ``factor`` block of an integer 2-D array, rounded, same dtype.

    The sums are taken one strided slice at a time (rows, then columns), in the narrowest
    integer type that cannot overflow: one pass over the full-resolution data. ``bits``: the
    values of unsigned data are known to fit this many bits (DICOM BitsStored, the bits
    above it masked off), which lets 12-bit data be summed in 16 bits.
    """
    if stored.ndim != 2 or stored.dtype.kind not in "ui":
        raise ValueError(f"expected a 2-D integer array, got {stored.dtype} {stored.shape}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    rows, cols = stored.shape
    out_rows, out_cols = rows // factor, cols // factor
    if factor == 1 or out_rows == 0 or out_cols == 0:
        return stored
    top = (rows - out_rows * factor) // 2
    left = (cols - out_cols * factor) // 2
    block = stored[top : top + out_rows * factor, left : left + out_cols * factor]

    info = np.iinfo(stored.dtype)
    low, high = int(info.min), int(info.max)
    if bits is not None and stored.dtype.kind == "u" and 1 <= bits < 8 * stored.itemsize:
        high = (1 << bits) - 1
    row_acc = block[0::factor].astype(_accumulator(low, high, factor))
    for k in range(1, factor):
        np.add(row_acc, block[k::factor], out=row_acc)
    count = factor * factor
    total = row_acc[:, 0::factor].astype(_accumulator(low, high, count))
    for k in range(1, factor):
        np.add(total, row_acc[:, k::factor], out=total)
    total += count // 2  # round half up; floor division below rounds toward -inf for signed
    total //= count
    return total.astype(stored.dtype)
