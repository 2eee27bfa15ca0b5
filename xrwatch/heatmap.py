"""Heatmap overlay PNGs from the model's ``cam`` output.

The overlay is the model-input image (what the network saw, after preprocessing) in grey,
with the predicted class's activation map - upsampled bilinearly to the input size, its
negative part cut off and scaled to [0, 1] per image - as a colour overlay, and a legend
strip: the colour scale and the label with its probability. Nothing from the file or its
DICOM header is drawn, and the PNG carries no text chunks.

The map shows where the evidence for the predicted class was strongest *relative to the
rest of this image*. It is not a segmentation, not a measure of certainty and not proof
of what caused the prediction.

Files are written atomically (temporary file in the same folder, fsync, rename): a reader
never sees a partial PNG.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xrwatch.atomic import atomic_file

logger = logging.getLogger(__name__)

ALPHA = 0.45  # weight of the colour map where the activation is highest
LEGEND_HEIGHT = 18  # pixels of the legend strip under the image
MIN_SIDE = 224  # smaller model inputs are enlarged (nearest) so legend and map stay readable
PNG_COMPRESS_LEVEL = 1  # zlib level: 1 writes ~3x faster than the default 6, files ~20 % bigger

# A perceptual "turbo"-like ramp: dark blue -> cyan -> green -> yellow -> red.
_STOPS = np.array(
    [
        [48, 18, 59],
        [50, 136, 189],
        [63, 208, 152],
        [171, 221, 60],
        [253, 174, 50],
        [215, 48, 39],
        [122, 4, 3],
    ],
    dtype=np.float64,
)


def _ramp(n: int) -> np.ndarray:
    v = np.linspace(0.0, 1.0, n) * (len(_STOPS) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_STOPS) - 1)
    t = (v - lo)[:, None]
    return (_STOPS[lo] * (1 - t) + _STOPS[hi] * t).round().astype(np.uint8)


_LUT = _ramp(256)  # 256 colours: indexing is much faster than interpolating per pixel


def colormap(values: np.ndarray) -> np.ndarray:
    """float array in [0, 1] -> uint8 RGB (..., 3)."""
    return _LUT[(np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)]


def heat_image(cam: np.ndarray, size: int) -> Image.Image:
    """A class map (h x w) -> ``size`` x ``size`` 8-bit image: negative part cut off, scaled
    to [0, 255] by its peak, upsampled bilinearly (as pytorch-grad-cam does)."""
    positive = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    peak = float(positive.max())
    scaled = positive * (255.0 / peak) if peak > 0 else positive
    small = Image.fromarray((scaled + 0.5).astype(np.uint8), mode="L")
    return small.resize((size, size), Image.Resampling.BILINEAR)


_PALETTE = _LUT.reshape(-1).tolist()
_ALPHA_LUT = [round(ALPHA * v) for v in range(256)]  # heat -> blend weight of the colour


def render_overlay(pixels: np.ndarray, cam: np.ndarray, caption: str) -> Image.Image:
    """The overlay of ``cam`` (h x w, one class) on ``pixels`` (S x S in [0, 1])."""
    gray = np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0)
    size = gray.shape[0]
    heat = heat_image(cam, size)
    colour = heat.copy()
    colour.putpalette(_PALETTE)  # "L" with a palette becomes "P": the colour scale
    base = Image.fromarray((gray * 255.0 + 0.5).astype(np.uint8), mode="L").convert("RGB")
    image = Image.composite(colour.convert("RGB"), base, heat.point(_ALPHA_LUT))
    if size < MIN_SIDE:
        factor = -(-MIN_SIDE // size)
        image = image.resize((size * factor, size * factor), Image.Resampling.NEAREST)
    width = image.width
    canvas = Image.new("RGB", (width, image.height + LEGEND_HEIGHT), (0, 0, 0))
    canvas.paste(image, (0, 0))
    bar_w = max(width // 4, 32)
    ramp = colormap(np.linspace(0.0, 1.0, bar_w))[None].repeat(LEGEND_HEIGHT - 8, axis=0)
    canvas.paste(Image.fromarray(ramp, mode="RGB"), (4, image.height + 4))
    draw = ImageDraw.Draw(canvas)
    draw.text((bar_w + 8, image.height + 3), caption, fill=(255, 255, 255))
    return canvas


def heatmap_path(root: Path, rel: str) -> Path:
    """``ROOT/<relative path>.png``: the input's own relative path, nothing else."""
    return Path(root) / (rel + ".png")


def write_png_atomic(image: Image.Image, path: Path) -> Path:
    """Write ``image`` as PNG to ``path`` atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, suffix=".png.tmp") as fh:
        image.save(fh, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return path


def write_heatmap(
    root: Path, rel: str, pixels: np.ndarray, cam: np.ndarray, label: str, confidence: float
) -> Path:
    """Render and atomically write the overlay of one result; returns its path."""
    caption = f"CAM for {label}, p={confidence:.2f}"  # the bar runs from low to high
    return write_png_atomic(render_overlay(pixels, cam, caption), heatmap_path(root, rel))
