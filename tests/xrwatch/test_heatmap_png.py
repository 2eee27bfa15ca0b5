"""The overlay PNG encoder (checked against Pillow's decoder) and the parallel heatmap writer."""

from __future__ import annotations

import io
import logging
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xrwatch import heatmap
from xrwatch.heatmap import HeatmapJob, HeatmapWriter, render_overlay
from xrwatch.pngwrite import PNG_SIGNATURE, encode_rgb


def _chunks(data: bytes) -> list[bytes]:
    """The chunk types of a PNG file, each CRC checked."""
    assert data[:8] == PNG_SIGNATURE
    kinds, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        kinds.append(kind)
        pos += 12 + length
    assert pos == len(data)
    return kinds


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return np.asarray(img)


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 7), (1, 256), (2, 1), (3, 5), (17, 33), (242, 224), (274, 256)]
)
def test_encoder_round_trips_through_pillow(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    noise = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)  # every byte difference wraps
    smooth = np.broadcast_to(np.arange(shape[1], dtype=np.uint8)[None, :, None], (*shape, 3))
    for pixels in (noise, np.ascontiguousarray(smooth), noise[:, ::-1]):  # also non-contiguous
        data = encode_rgb(pixels)
        assert np.array_equal(_decode(data), pixels)
        assert _chunks(data) == [b"IHDR", b"IDAT", b"IEND"]  # no tEXt, iTXt, zTXt, tIME


def test_encoder_rejects_what_is_not_8_bit_rgb() -> None:
    for bad in (
        np.zeros((4, 4), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4, 4, 3), np.float32),
        np.zeros((0, 4, 3), np.uint8),
    ):
        with pytest.raises(ValueError, match="uint8"):
            encode_rgb(bad)


def _job(root: Path, rel: str, seed: int, size: int = 64) -> HeatmapJob:
    rng = np.random.default_rng(seed)
    return HeatmapJob(
        root=root,
        rel=rel,
        pixels=rng.random((size, size), dtype=np.float32),
        cam=rng.normal(size=(4, 4)).astype(np.float32),
        label="Pneumonia",
        confidence=0.25 + seed / 100,
    )


def test_written_file_is_the_rendered_overlay_without_text_chunks(tmp_path: Path) -> None:
    job = _job(tmp_path, "sub/a.dcm", 1)
    (path,) = HeatmapWriter(threads=1).write_many([job])
    assert path == tmp_path / "sub" / "a.dcm.png"
    assert path is not None
    data = path.read_bytes()
    caption = "CAM for Pneumonia, p=0.26"
    assert np.array_equal(_decode(data), np.asarray(render_overlay(job.pixels, job.cam, caption)))
    assert _chunks(data) == [b"IHDR", b"IDAT", b"IEND"]


def test_legend_is_drawn_once_per_width_and_caption(tmp_path: Path) -> None:
    heatmap._cached_legend.cache_clear()
    jobs = [_job(tmp_path, f"{i}.png", 7) for i in range(5)]  # same caption, same size
    HeatmapWriter(threads=1).write_many(jobs)
    info = heatmap._cached_legend.cache_info()
    assert (info.misses, info.hits) == (1, 4)


def test_write_many_writes_in_parallel_and_keeps_order(tmp_path: Path) -> None:
    jobs = [_job(tmp_path, f"d{i % 3}/{i}.png", i, size=32 + 8 * i) for i in range(8)]
    names: set[str] = set()
    real_write = heatmap.write_heatmap

    def spy(*args: object, **kwargs: object) -> Path:
        names.add(threading.current_thread().name)
        return real_write(*args, **kwargs)  # type: ignore[arg-type]

    before = set(threading.enumerate())
    with pytest.MonkeyPatch.context() as mp, HeatmapWriter(threads=3) as writer:
        mp.setattr(heatmap, "write_heatmap", spy)
        paths = writer.write_many(jobs)
        again = writer.write_many(jobs[:2])  # the same pool serves the next batch
    assert paths == [tmp_path / f"d{i % 3}" / f"{i}.png.png" for i in range(8)]
    assert again == paths[:2]
    for job, path in zip(jobs, paths, strict=True):
        assert path is not None
        caption = f"CAM for Pneumonia, p={job.confidence:.2f}"
        expected = np.asarray(render_overlay(job.pixels, job.cam, caption))
        assert np.array_equal(_decode(path.read_bytes()), expected)
    assert names and all(n.startswith("xrwatch-heatmap") for n in names)
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]  # closed
    assert not list(tmp_path.rglob(".*"))  # no temp files left behind


def test_failed_write_is_logged_and_returns_none_for_that_file_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "b.png.png").mkdir()  # renaming the finished file onto a folder fails
    jobs = [_job(tmp_path, name, i) for i, name in enumerate(("a.png", "b.png", "c.png"))]
    jobs[1] = HeatmapJob(**{**jobs[1].__dict__, "source": "/in/b.png"})
    with caplog.at_level(logging.ERROR, logger="xrwatch.heatmap"), HeatmapWriter(2) as writer:
        paths = writer.write_many(jobs)
    assert paths == [tmp_path / "a.png.png", None, tmp_path / "c.png.png"]
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("/in/b.png: cannot write its heatmap ")
    assert str(tmp_path / "b.png.png") in message
    assert not list(tmp_path.rglob(".*"))


def test_other_errors_are_raised_after_every_write_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = heatmap.write_heatmap

    def buggy(root: Path, rel: str, *args: object) -> Path:
        if rel == "bug.png":
            raise RuntimeError("a bug")
        return real_write(root, rel, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(heatmap, "write_heatmap", buggy)
    jobs = [_job(tmp_path, name, i) for i, name in enumerate(("bug.png", "x.png", "y.png"))]
    with HeatmapWriter(2) as writer, pytest.raises(RuntimeError, match="a bug"):
        writer.write_many(jobs)
    assert (tmp_path / "x.png.png").is_file() and (tmp_path / "y.png.png").is_file()


def test_closed_writer_still_writes_in_the_callers_thread(tmp_path: Path) -> None:
    writer = HeatmapWriter(2)
    writer.close()
    paths = writer.write_many([_job(tmp_path, "a.png", 1), _job(tmp_path, "b.png", 2)])
    assert paths == [tmp_path / "a.png.png", tmp_path / "b.png.png"]
    with pytest.raises(ValueError, match="threads"):
        HeatmapWriter(0)
