"""The VOI arithmetic of DICOM PS3.3 C.11.2.1.2, mapped straight to [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from xrwatch.imageio.voi import VOIError, apply_voi_lut, apply_window, robust_normalise


def test_linear_window_matches_the_standard() -> None:
    # c = 2048, w = 4096: x <= 0.5 - 2047.5 -> 0; x > 2047.5 + 2047.5 -> 1
    x = np.array([-10.0, 0.0, 2047.5, 4094.0, 4096.0])
    out = apply_window(x, 2048, 4096, "LINEAR")
    expected = np.clip((x - 2047.5) / 4095 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected)
    assert out[0] == 0.0 and out[-1] == 1.0 and out[2] == pytest.approx(0.5)


def test_width_one_is_a_threshold() -> None:
    out = apply_window(np.array([99.0, 99.5, 100.0]), 100, 1, "LINEAR")
    np.testing.assert_array_equal(out, [0.0, 0.0, 1.0])


def test_linear_exact_and_sigmoid_centres() -> None:
    assert apply_window(np.array([10.0]), 10, 4, "LINEAR_EXACT")[0] == 0.5
    assert apply_window(np.array([10.0]), 10, 4, "sigmoid")[0] == 0.5
    assert apply_window(np.array([1e9]), 10, 4, "SIGMOID")[0] == 1.0  # no overflow


@pytest.mark.parametrize(
    ("width", "function"), [(0.5, "LINEAR"), (0, "LINEAR_EXACT"), (-1, "SIGMOID"), (10, "GAMMA")]
)
def test_invalid_windows_raise(width: float, function: str) -> None:
    with pytest.raises(VOIError):
        apply_window(np.zeros(3), 0, width, function)


def _lut(first: int, bits: int, data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first, bits]
    item.LUTData = data
    return item


def test_voi_lut_clamps_and_scales() -> None:
    out = apply_voi_lut(
        np.array([0.0, 10.0, 11.0, 12.0, 99.0]), _lut(10, 2, [0, 1, 3]), signed=False
    )
    np.testing.assert_allclose(out, [0.0, 0.0, 1 / 3, 1.0, 1.0])


def test_voi_lut_data_stored_as_ow_bytes() -> None:
    item = Dataset()
    item.LUTDescriptor = [3, 0, 12]
    item.LUTData = np.array([0, 2048, 4095], "<u2").tobytes()
    out = apply_voi_lut(np.array([0.0, 1.0, 2.0]), item, signed=False)
    np.testing.assert_allclose(out, [0.0, 2048 / 4095, 1.0])


def test_voi_lut_signed_first_value() -> None:
    item = _lut(65536 - 2, 8, [0, 128, 255])  # first mapped value -2 stored as US
    out = apply_voi_lut(np.array([-2.0, -1.0, 0.0]), item, signed=True)
    np.testing.assert_allclose(out, [0.0, 128 / 255, 1.0])


def test_voi_lut_with_an_understated_bit_depth_trusts_the_data() -> None:
    out = apply_voi_lut(np.array([0.0, 1.0]), _lut(0, 8, [0, 4095]), signed=False)
    np.testing.assert_allclose(out, [0.0, 1.0])


def test_robust_normalise() -> None:
    x = np.arange(10_000, dtype=np.float64).reshape(100, 100)
    x[0, 0] = -1e6  # an outlier does not squash the rest
    out = robust_normalise(x)
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.45 < out.mean() < 0.55
    np.testing.assert_array_equal(robust_normalise(np.full((4, 4), 7.0)), np.zeros((4, 4)))
