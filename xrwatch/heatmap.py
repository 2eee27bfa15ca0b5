"""Heatmap overlay PNGs from the model's ``cam`` output.

The overlay is the model-input image (what the network saw, after preprocessing) in grey,
with the predicted class's activation map - upsampled bilinearly to the input size, its
negative part cut off and scaled min-to-max per image (as pytorch-grad-cam scales it, so the
lowest value is 0 and the highest 1) - as a colour overlay, and a legend strip: the colour
scale and the label with its probability. A flagged result says so in the image, in a
banner above it: ``LOW CONFIDENCE`` (the map is drawn), or ``OUT OF SCOPE`` / ``OUT OF
POPULATION`` (no map and no class: the input is not a frontal chest X-ray, or not of the
population the model was made for, so a map "for" a class would mean nothing). Nothing
from the file or its DICOM header is drawn, and the PNG carries no text chunks.

The map shows where the evidence for the predicted class was strongest *relative to the
rest of this image*. It is not a segmentation, not a measure of certainty and not proof
of what caused the prediction.

Files are written atomically (temporary file in the same folder, fsync, rename): a reader
never sees a partial PNG. :class:`HeatmapWriter` draws and encodes the overlays of a batch
in a few threads, then writes them with one wait for the disk; ``classify --heatmaps`` uses
it, and so does the daemon, in the background while it infers the next batch.
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

from xrwatch import flags
from xrwatch.atomic import make_dirs, replace_all, write_atomic
from xrwatch.pngwrite import encode_rgb

logger = logging.getLogger(__name__)

ALPHA = 0.45  # weight of the colour map where the activation is highest
LEGEND_HEIGHT = 18  # pixels of the legend strip under the image
MIN_SIDE = 224  # smaller model inputs are enlarged (nearest) so legend and map stay readable
PNG_COMPRESS_LEVEL = 1  # deflate level (xrwatch.pngwrite): the fastest
PNG_TMP_SUFFIX = ".png.tmp"  # temporary files, hidden (".") beside their PNG
LEGEND_CACHE_SIZE = 512  # legend strips kept, per (width, caption): ~14 KB each at 256 px
MAX_THREADS = 4  # HeatmapWriter's drawing threads: half the CPUs, at most this

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
    min-to-max to [0, 255], upsampled bilinearly (as pytorch-grad-cam does). Scaled by its
    peak alone, a map whose values are all alike (a small grid on a real image) would be
    one flat colour; min-to-max shows where it is highest and lowest. A constant map is 0."""
    positive = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    low, high = float(positive.min()), float(positive.max())
    scaled = (positive - low) * (255.0 / (high - low)) if high > low else positive * 0.0
    small = Image.fromarray((scaled + 0.5).astype(np.uint8), mode="L")
    return small.resize((size, size), Image.Resampling.BILINEAR)


_PALETTE = _LUT.reshape(-1).tolist()
_ALPHA_LUT = [round(ALPHA * v) for v in range(256)]  # heat -> blend weight of the colour


def _legend(width: int, caption: str, scale: bool = True) -> np.ndarray:
    """The legend strip (``LEGEND_HEIGHT`` x ``width`` x 3): colour scale (unless ``scale``
    is false: no map drawn), then the caption."""
    strip = Image.new("RGB", (width, LEGEND_HEIGHT), (0, 0, 0))
    bar_w = max(width // 4, 32) if scale else -4
    if scale:
        ramp = colormap(np.linspace(0.0, 1.0, bar_w))[None].repeat(LEGEND_HEIGHT - 8, axis=0)
        strip.paste(Image.fromarray(ramp, mode="RGB"), (4, 4))
    ImageDraw.Draw(strip).text((bar_w + 8, 3), caption, fill=(255, 255, 255))
    pixels = np.asarray(strip).copy()
    pixels.setflags(write=False)  # shared by every overlay (and thread) with this caption
    return pixels


# Drawing the caption costs more than the rest of the overlay; captions repeat (one per
# label and rounded probability, at one width per model), so each strip is drawn once.
_cached_legend = functools.lru_cache(maxsize=LEGEND_CACHE_SIZE)(_legend)

# A flagged result's banner, above the image: (text, background colour) per flag; a flag
# not listed gets its name on grey. Flags whose label is not to be read get no class map.
BANNERS = {
    flags.LOW_CONFIDENCE: ("LOW CONFIDENCE: {label} p={p:.2f}", (200, 120, 0)),
    flags.OUT_OF_SCOPE: ("OUT OF SCOPE: ignore the label", (170, 0, 0)),
    flags.OUT_OF_POPULATION: ("OUT OF POPULATION: ignore the label", (120, 0, 140)),
}
OTHER_BANNER = (90, 90, 90)
NO_MAP_FLAGS = frozenset({flags.OUT_OF_SCOPE, flags.OUT_OF_POPULATION})


@functools.lru_cache(maxsize=LEGEND_CACHE_SIZE)
def _banner(width: int, text: str, colour: tuple[int, int, int]) -> np.ndarray:
    """A ``LEGEND_HEIGHT`` x ``width`` strip in ``colour`` with ``text`` in white."""
    strip = Image.new("RGB", (width, LEGEND_HEIGHT), colour)
    ImageDraw.Draw(strip).text((4, 3), text, fill=(255, 255, 255))
    pixels = np.asarray(strip).copy()
    pixels.setflags(write=False)
    return pixels


def banner_of(flag: str, label: str, confidence: float) -> tuple[str, tuple[int, int, int]] | None:
    """The banner text and colour of a flagged result; None when it is not flagged."""
    if not flag:
        return None
    text, colour = BANNERS.get(flag, (flag.upper().replace("_", " "), OTHER_BANNER))
    return text.format(label=label, p=confidence), colour


@functools.cache
def _blend_table() -> np.ndarray:
    """Every overlay pixel there can be, (256 * heat + grey) -> RGB: the colour of ``heat``
    over ``grey`` with weight ``ALPHA * heat / 255``, as Pillow's ``composite`` draws it (the
    table *is* that composite over a 256 x 256 grid, so a lookup gives the same pixels)."""
    ramp = np.arange(256, dtype=np.uint8)
    heat = Image.fromarray(np.repeat(ramp[:, None], 256, axis=1), mode="L")
    grey = Image.fromarray(np.repeat(ramp[None, :], 256, axis=0), mode="L").convert("RGB")
    colour = heat.copy()
    colour.putpalette(_PALETTE)  # "L" with a palette becomes "P": the colour scale
    blended = Image.composite(colour.convert("RGB"), grey, heat.point(_ALPHA_LUT))
    table = np.ascontiguousarray(np.asarray(blended).reshape(256 * 256, 3))
    table.setflags(write=False)
    return table


def overlay_pixels(
    pixels: np.ndarray,
    cam: np.ndarray | None,
    caption: str,
    banner: tuple[str, tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """The overlay of ``cam`` (h x w, one class) on ``pixels`` (S x S in [0, 1]), with its
    legend, as uint8 RGB (height x width x 3). One table lookup per pixel blends the grey
    image with the colour scale; inputs under ``MIN_SIDE`` are enlarged (nearest) after it.
    ``cam`` None: the grey image alone, legend without a scale. ``banner`` (text, colour):
    a strip above the image (:func:`banner_of`)."""
    gray = np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0)
    size = gray.shape[0]
    index = (
        np.asarray(heat_image(cam, size)).astype(np.intp)
        if cam is not None
        else np.zeros((size, size), dtype=np.intp)  # heat 0: the grey pixel itself
    )
    index <<= 8
    index += (gray * 255.0 + 0.5).astype(np.uint8)
    table = _blend_table()
    top = LEGEND_HEIGHT if banner is not None else 0
    side = size * -(-MIN_SIDE // size) if size < MIN_SIDE else size
    out = np.empty((top + side + LEGEND_HEIGHT, side, 3), dtype=np.uint8)
    if size < MIN_SIDE:
        small = Image.fromarray(table.take(index, axis=0), mode="RGB")
        out[top : top + side] = np.asarray(small.resize((side, side), Image.Resampling.NEAREST))
    else:
        np.take(table, index, axis=0, out=out[top : top + side])
    out[top + side :] = _cached_legend(side, caption, cam is not None)
    if banner is not None:
        out[:top] = _banner(side, *banner)
    return out


def render_overlay(
    pixels: np.ndarray,
    cam: np.ndarray | None,
    caption: str,
    banner: tuple[str, tuple[int, int, int]] | None = None,
) -> Image.Image:
    """:func:`overlay_pixels` as a Pillow image."""
    return Image.fromarray(overlay_pixels(pixels, cam, caption, banner), mode="RGB")


def heatmap_path(root: Path, rel: str) -> Path:
    """``ROOT/<relative path>.png``: the input's own relative path, nothing else."""
    return Path(root) / (rel + ".png")


def write_png_atomic(image: Image.Image | np.ndarray, path: Path) -> Path:
    """Write ``image`` (RGB) as PNG to ``path`` as :class:`HeatmapWriter` writes a batch
    (:func:`replace_all`: temp file, fsync, rename, folder fsync); raises the ``OSError``."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    write_atomic(path, encode_rgb(image, level=PNG_COMPRESS_LEVEL), suffix=PNG_TMP_SUFFIX)
    return path


def caption_of(label: str, confidence: float, flag: str = "") -> str:
    """The legend's text: the class whose map is drawn, or, for a flag whose label is not to
    be read (:data:`NO_MAP_FLAGS`), that none is."""
    if flag == flags.OUT_OF_SCOPE:
        return "no class map: input out of scope"
    if flag in NO_MAP_FLAGS:
        return "no class map: outside the model's population"
    return f"CAM for {label}, p={confidence:.2f}"  # the bar runs from low to high


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
    flag: str = ""  # the result's flag (xrwatch.flags): shown in a banner above the image


def job_pixels(job: HeatmapJob) -> np.ndarray:
    """``job``'s overlay as uint8 RGB: banner when flagged, no map when out of scope."""
    cam = None if job.flag in NO_MAP_FLAGS else job.cam
    caption = caption_of(job.label, job.confidence, job.flag)
    return overlay_pixels(job.pixels, cam, caption, banner_of(job.flag, job.label, job.confidence))


def encode_overlay(job: HeatmapJob) -> bytes:
    """The PNG file of ``job``'s overlay."""
    return encode_rgb(job_pixels(job), level=PNG_COMPRESS_LEVEL)


def default_threads() -> int:
    """Half the CPUs, 1 to :data:`MAX_THREADS`: the daemon infers the next batch while these
    draw. On 2 cores, one thread wrote a batch as fast as two or four, or faster
    (``benchmarks/explain.py`` times them side by side), and leaves inference its core."""
    return max(1, min(MAX_THREADS, (os.cpu_count() or 1) // 2))


class HeatmapWriter:
    """Writes the overlays of a batch, each atomically.

    The overlays are drawn and PNG-encoded in a few threads (the lookup, Pillow's resize and
    the deflate release the GIL), then written together by :func:`replace_all`: every
    temporary file, then every fsync, then every rename, so the batch waits for the disk
    once rather than once per file. The pool is started on the first batch of more than one
    overlay and ends with :meth:`close` (or the ``with`` block); after that, overlays are
    drawn one after another in the caller's thread.
    """

    def __init__(self, threads: int | None = None, *, name: str = "xrwatch-heatmap") -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads or default_threads()
        self._name = name
        self._pool: cf.ThreadPoolExecutor | None = None
        self._batches: cf.ThreadPoolExecutor | None = None  # runs submit_many's batches
        self._closed = False
        self._lock = threading.Lock()

    def __enter__(self) -> HeatmapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for writes in progress and end the threads."""
        with self._lock:
            batches, self._batches = self._batches, None
            self._closed = True
        if batches is not None:
            batches.shutdown(wait=True)  # before the pool its batches draw in
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def submit_many(self, jobs: Sequence[HeatmapJob]) -> cf.Future[list[Path | None]]:
        """:meth:`write_many` in the background: the caller goes on (the daemon infers the
        next batch) and reads the result from the future. Batches are written one after
        another, in the order submitted. After :meth:`close`, the batch is written before
        this returns, and the future is already done."""
        with self._lock:  # submitted under the lock: close() cannot shut it down in between
            if self._batches is None and not self._closed:
                self._batches = cf.ThreadPoolExecutor(1, thread_name_prefix=self._name + "-batch")
            if self._batches is not None:
                return self._batches.submit(self.write_many, jobs)
        done: cf.Future[list[Path | None]] = cf.Future()
        try:
            done.set_result(self.write_many(jobs))
        except Exception as exc:
            done.set_exception(exc)
        return done

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
        encoded: list[bytes | BaseException] = []
        if pool is None:
            for job in jobs:
                try:
                    encoded.append(encode_overlay(job))
                except Exception as exc:  # raised below, once the others are written
                    encoded.append(exc)
        else:
            futures = [pool.submit(encode_overlay, job) for job in jobs]
            cf.wait(futures)
            encoded = [f.exception() or f.result() for f in futures]
        paths: list[Path | None] = [None] * len(jobs)
        staged: list[tuple[int, Path, bytes]] = []
        for i, (job, data) in enumerate(zip(jobs, encoded, strict=True)):
            path = heatmap_path(job.root, job.rel)
            if isinstance(data, OSError):
                _failed(job, path, data)
            elif not isinstance(data, BaseException):
                try:
                    make_dirs(path.parent)  # new folders durable, like the files in them
                    staged.append((i, path, data))
                except OSError as exc:
                    _failed(job, path, exc)
        errors = replace_all([(path, data) for _, path, data in staged], suffix=PNG_TMP_SUFFIX)
        for (i, path, _), error in zip(staged, errors, strict=True):
            if error is None:
                paths[i] = path
            else:
                _failed(jobs[i], path, error)
        for job, bug in zip(jobs, encoded, strict=True):
            if isinstance(bug, BaseException) and not isinstance(bug, OSError):
                logger.error("%s: cannot draw its heatmap: %r", job.source or job.rel, bug)
                raise bug
        return paths


def _failed(job: HeatmapJob, path: Path, exc: OSError) -> None:
    """The result stands without its picture: say which input and file, and why."""
    logger.error("%s: cannot write its heatmap %s: %s", job.source or job.rel, path, exc)
