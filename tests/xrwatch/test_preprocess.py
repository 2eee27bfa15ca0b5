"""The one preprocessing definition: spec validation, serialisation, apply, load_model_input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xrwatch.errors import ConfigError
from xrwatch.imageio import read_image
from xrwatch.preprocess import PREPROCESS_VERSION, PreprocessSpec, load_model_input


def test_round_trips_through_dict_and_json() -> None:
    spec = PreprocessSpec(size=256, resize="bicubic", aspect="pad")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    data = json.loads(spec.to_json())
    assert data["size"] == 256 and data["version"] == PREPROCESS_VERSION
    assert data["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.parametrize(
    "data",
    [
        {"size": 8},
        {"size": 224.0},
        {"resize": "nearest"},
        {"aspect": "crop"},
        {"std": [0.2, 0.2, 0.0]},
        {"colour": "gray"},
        {"version": PREPROCESS_VERSION + 1},
    ],
)
def test_invalid_specs_are_config_errors(data: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PreprocessSpec.from_dict(data)


def test_from_json_rejects_non_objects() -> None:
    with pytest.raises(ConfigError):
        PreprocessSpec.from_json("[1, 2]")
    with pytest.raises(ConfigError):
        PreprocessSpec.from_json("{not json")


def test_stretch_output_shape_and_range() -> None:
    pixels = np.tile(np.linspace(0, 1, 300, dtype=np.float32), (200, 1))
    out = PreprocessSpec(size=64).apply(pixels)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out[:, 0].mean() < 0.02 and out[:, -1].mean() > 0.98
    assert np.all(np.diff(out[32]) >= -1e-6)  # the ramp stays a ramp


def test_pad_letterboxes_with_black() -> None:
    pixels = np.ones((100, 200), np.float32)
    out = PreprocessSpec(size=64, aspect="pad").apply(pixels)
    assert out.shape == (64, 64)
    assert out[:15].max() == 0.0 and out[-15:].max() == 0.0  # bands above and below
    np.testing.assert_allclose(out[17:47], 1.0, atol=1e-6)


def test_constant_image_stays_constant() -> None:
    for method in ("bilinear", "bicubic", "area"):
        out = PreprocessSpec(size=32, resize=method).apply(np.full((90, 70), 0.25, np.float32))  # type: ignore[arg-type]
        np.testing.assert_allclose(out, 0.25, atol=1e-5)


def test_rejects_non_2d_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        PreprocessSpec().apply(np.zeros((4, 4, 3), np.float32))


def test_min_decode_side_keeps_headroom() -> None:
    assert PreprocessSpec(size=224).min_decode_side == 336
    assert PreprocessSpec(size=225).min_decode_side == 338


def test_load_model_input_is_read_then_apply(real_images: list[Path]) -> None:
    spec = PreprocessSpec(size=224)
    path = next(p for p in real_images if p.suffix.lower() == ".jpeg")
    model_input, meta = load_model_input(path, spec)
    assert model_input.shape == (224, 224) and model_input.dtype == np.float32
    expected = spec.apply(read_image(path, min_side=spec.min_decode_side).pixels)
    np.testing.assert_array_equal(model_input, expected)
    assert meta.path == str(path)
    # draft decoding changes the model input by well under one 8-bit grey level on average
    full = spec.apply(read_image(path).pixels)
    assert np.abs(full - model_input).mean() < 1 / 255
