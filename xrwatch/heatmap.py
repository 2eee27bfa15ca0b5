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
never sees a partial PNG. :class:`HeatmapWriter` writes the overlays of a batch in a few
threads; the daemon and ``classify --heatmaps`` both use it.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xrwatch.atomic import atomic_file
from xrwatch.pngwrite import encode_rgb

logger = logging.getLogger(__name__)

ALPHA = 0.45  # weight of the colour map where the activation is highest
LEGEND_HEIGHT = 18  # pixels of the legend strip under the image
MIN_SIDE = 224  # smaller model inputs are enlarged (nearest) so legend and map stay readable
PNG_COMPRESS_LEVEL = 1  # zlib level: 1 writes ~3x faster than the default 6, files ~20 % bigger
LEGEND_CACHE_SIZE = 512  # legend strips kept, per (width, caption): ~14 KB each at 256 px
MAX_THREADS = 4  # HeatmapWriter's default: min(this, CPUs); more only queue on the disk

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


def _legend(width: int, caption: str) -> np.ndarray:
    """The legend strip (``LEGEND_HEIGHT`` x ``width`` x 3): colour scale, then the caption."""
    strip = Image.new("RGB", (width, LEGEND_HEIGHT), (0, 0, 0))
    bar_w = max(width // 4, 32)
    ramp = colormap(np.linspace(0.0, 1.0, bar_w))[None].repeat(LEGEND_HEIGHT - 8, axis=0)
    strip.paste(Image.fromarray(ramp, mode="RGB"), (4, 4))
    ImageDraw.Draw(strip).text((bar_w + 8, 3), caption, fill=(255, 255, 255))
    pixels = np.asarray(strip).copy()
    pixels.setflags(write=False)  # shared by every overlay (and thread) with this caption
    return pixels


# Drawing the caption costs more than the rest of the overlay; captions repeat (one per
# label and rounded probability, at one width per model), so each strip is drawn once.
_cached_legend = functools.lru_cache(maxsize=LEGEND_CACHE_SIZE)(_legend)


def overlay_pixels(pixels: np.ndarray, cam: np.ndarray, caption: str) -> np.ndarray:
    """The overlay of ``cam`` (h x w, one class) on ``pixels`` (S x S in [0, 1]), with its
    legend, as uint8 RGB (height x width x 3)."""
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
    return np.concatenate([np.asarray(image), _cached_legend(image.width, caption)])


def render_overlay(pixels: np.ndarray, cam: np.ndarray, caption: str) -> Image.Image:
    """:func:`overlay_pixels` as a Pillow image."""
    return Image.fromarray(overlay_pixels(pixels, cam, caption), mode="RGB")


def heatmap_path(root: Path, rel: str) -> Path:
    """``ROOT/<relative path>.png``: the input's own relative path, nothing else."""
    return Path(root) / (rel + ".png")


def write_png_atomic(image: Image.Image | np.ndarray, path: Path) -> Path:
    """Write ``image`` (RGB) as PNG to ``path`` atomically (temp file, fsync, rename)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    data = encode_rgb(image, level=PNG_COMPRESS_LEVEL)  # before the temp file exists
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, suffix=".png.tmp") as fh:
        fh.write(data)
    return path


def caption_of(label: str, confidence: float) -> str:
    return f"CAM for {label}, p={confidence:.2f}"  # the bar runs from low to high


def write_heatmap(
    root: Path, rel: str, pixels: np.ndarray, cam: np.ndarray, label: str, confidence: float
) -> Path:
    """Render and atomically write the overlay of one result; returns its path."""
    overlay = overlay_pixels(pixels, cam, caption_of(label, confidence))
    return write_png_atomic(overlay, heatmap_path(root, rel))


@dataclass(frozen=True)
class HeatmapJob:
    """One overlay to write: ``root/<rel>.png`` from ``cam`` (the class's map) on ``pixels``."""

    root: Path
    rel: str
    pixels: np.ndarray  # the model input, S x S in [0, 1]
    cam: np.ndarray  # h x w, the predicted class's map
    label: str
    confidence: float
    source: str = ""  # how log lines name the input; ``rel`` when empty


def default_threads() -> int:
    return min(MAX_THREADS, os.cpu_count() or 1)


class HeatmapWriter:
    """Writes the overlays of a batch concurrently, each atomically.

    Pillow's resampling and compositing, zlib and fsync release the GIL, so a few threads
    overlap one overlay's wait for the disk with the next one's drawing and encoding. The
    pool is started on the first batch of more than one overlay and ends with :meth:`close`
    (or the ``with`` block); after that, overlays are written one after another in the
    caller's thread.
    """

    def __init__(self, threads: int | None = None, *, name: str = "xrwatch-heatmap") -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads or default_threads()
        self._name = name
        self._pool: cf.ThreadPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()

    def __enter__(self) -> HeatmapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for writes in progress and end the threads."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.shutdown(wait=True)

    def _executor(self) -> cf.ThreadPoolExecutor | None:
        with self._lock:
            if self._pool is None and not self._closed and self.threads > 1:
                self._pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix=self._name)
            return self._pool

    def write_many(self, jobs: Sequence[HeatmapJob]) -> list[Path | None]:
        """Write every job's overlay; returns, in order, each file's path, or None where
        writing failed with an ``OSError`` (logged naming the input and the file). Returns
        once every write has ended; any other exception (a bug) is raised after that."""
        pool = self._executor() if len(jobs) > 1 else None
        if pool is None:
            return [_write_job(job) for job in jobs]
        futures = [pool.submit(_write_job, job) for job in jobs]
        cf.wait(futures)
        return [f.result() for f in futures]


def _write_job(job: HeatmapJob) -> Path | None:
    path = heatmap_path(job.root, job.rel)
    try:
        return write_heatmap(job.root, job.rel, job.pixels, job.cam, job.label, job.confidence)
    except OSError as exc:  # the result stands without its picture
        logger.error("%s: cannot write its heatmap %s: %s", job.source or job.rel, path, exc)
        return None
