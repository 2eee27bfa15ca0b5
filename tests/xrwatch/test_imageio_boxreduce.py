"""Native DICOM at reduced resolution: block averages of the stored values (issue 12 item 13)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.dicom_factory import write_dicom
from xrwatch.imageio import read_image
from xrwatch.imageio.boxreduce import box_factor, box_reduce
from xrwatch.preprocess import PreprocessSpec


def _reference(stored: np.ndarray, factor: int) -> np.ndarray:
    """Block means by reshape (float64), rounded half up; remainder cropped centrally."""
    rows, cols = stored.shape
    n, m = rows // factor, cols // factor
    top, left = (rows - n * factor) // 2, (cols - m * factor) // 2
    block = stored[top : top + n * factor, left : left + m * factor].astype(np.float64)
    mean = block.reshape(n, factor, m, factor).mean(axis=(1, 3))
    return np.floor(mean + 0.5).astype(stored.dtype)


@pytest.mark.parametrize(
    ("dtype", "low", "high", "bits"),
    [
        (np.uint16, 0, 4096, 12),  # summed in 16 bits
        (np.uint16, 0, 65536, None),  # full 16-bit range: 32-bit sums
        (np.int16, -32768, 32768, None),  # signed, negative means round toward +inf at .5
        (np.uint8, 0, 256, None),
    ],
)
@pytest.mark.parametrize(("shape", "factor"), [((64, 48), 4), ((101, 77), 5), ((40, 40), 16)])
def test_box_reduce_equals_block_means(
    dtype: type, low: int, high: int, bits: int | None, shape: tuple[int, int], factor: int
) -> None:
    stored = np.random.default_rng(factor).integers(low, high, shape).astype(dtype)
    out = box_reduce(stored, factor, bits=bits)
    assert out.dtype == stored.dtype
    assert out.shape == (shape[0] // factor, shape[1] // factor)
    np.testing.assert_array_equal(out, _reference(stored, factor))


def test_box_reduce_does_not_overflow_at_the_top_of_the_range() -> None:
    stored = np.full((32, 32), 65535, np.uint16)
    assert (box_reduce(stored, 16) == 65535).all()
    assert (box_reduce(np.full((32, 32), 4095, np.uint16), 16, bits=12) == 4095).all()


def test_box_factor_keeps_the_shorter_side_and_needs_a_factor_of_two() -> None:
    assert box_factor(2140, 1760, 336) == 5  # 1760 // 5 = 352 >= 336
    assert box_factor(2140, 1760, None) == 1
    assert box_factor(2000, 1300, 700) == 1  # 1300 < 2 x 700: not worth it
    assert box_factor(3000, 1400, 700) == 2
    assert box_factor(1024, 1024, 336) == 1  # 1 MP: the extra pass costs what it saves


def _cr(rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    body = np.exp(-(((x - 0.5) / 0.35) ** 2 + ((y - 0.55) / 0.45) ** 2))
    noise = np.random.default_rng(0).normal(0, 12, (rows, cols))
    return np.clip(600 + 2800 * body + 200 * np.sin(y * 90) + noise, 0, 4095).astype(np.uint16)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_native_dicom_is_read_at_reduced_resolution_for_a_small_model(
    tmp_path: Path, photometric: str
) -> None:
    rows, cols = 2003, 1111  # 2.2 MP: large enough to be reduced
    stored = _cr(rows, cols)
    path = write_dicom(
        tmp_path / "cr.dcm",
        pixels=stored,
        bits_stored=12,
        modality="CR",
        photometric=photometric,
        window=(2100, 3000),
    )
    spec = PreprocessSpec()  # 224 px model: min_decode_side 336
    full = read_image(path)
    reduced = read_image(path, min_side=spec.min_decode_side)
    factor = cols // spec.min_decode_side
    assert factor == 3
    assert reduced.pixels.shape == (rows // factor, cols // factor)
    assert (reduced.meta.decoded_height, reduced.meta.decoded_width) == reduced.pixels.shape
    assert (reduced.meta.height, reduced.meta.width) == (rows, cols)
    assert reduced.pixels.dtype == np.float32
    # the reduced image is the window applied to the block means of the stored values
    expected = np.clip((_reference(stored, factor) - (2100 - 0.5)) / 2999 + 0.5, 0, 1)
    if photometric == "MONOCHROME1":
        expected = 1 - expected
    np.testing.assert_allclose(reduced.pixels, expected, atol=1e-5)
    # and the model input hardly changes (JPEG draft mode: ~0.3-0.5/255 on real JPEGs)
    diff = float(np.abs(spec.apply(reduced.pixels) - spec.apply(full.pixels)).mean()) * 255
    assert diff < 0.5, f"model input differs by {diff:.2f}/255"


def test_bits_above_bits_stored_are_masked_before_averaging(tmp_path: Path) -> None:
    stored = _cr(1500, 1500)
    path = write_dicom(tmp_path / "a.dcm", pixels=stored, bits_stored=12, window=(2100, 3000))
    noisy = stored | np.uint16(0xF000)  # an overlay in the unused high bits
    dirty = write_dicom(tmp_path / "b.dcm", pixels=noisy, bits_stored=12, window=(2100, 3000))
    clean = read_image(path, min_side=336).pixels
    np.testing.assert_array_equal(read_image(dirty, min_side=336).pixels, clean)


def test_small_images_and_no_min_side_are_read_in_full(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "s.dcm", pixels=_cr(1024, 1024), bits_stored=12)
    assert read_image(path, min_side=336).pixels.shape == (1024, 1024)
    big = write_dicom(tmp_path / "b.dcm", pixels=_cr(1500, 1400), bits_stored=12)
    assert read_image(big).pixels.shape == (1500, 1400)
    assert read_image(big, min_side=336).pixels.shape == (1500 // 4, 1400 // 4)
