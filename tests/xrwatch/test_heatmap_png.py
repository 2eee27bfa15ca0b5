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

from xrwatch import flags, heatmap
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


def test_isal_and_zlib_backends_write_the_same_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    from xrwatch import pngwrite

    assert pngwrite.DEFLATE == "isal"  # a dependency: the fast path is the one that ships
    pixels = render_overlay(
        np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64),
        np.arange(16, dtype=np.float32).reshape(4, 4),
        "CAM for Normal, p=0.50",
    )
    fast = encode_rgb(np.asarray(pixels))
    monkeypatch.setattr(pngwrite, "_deflate", zlib)
    monkeypatch.setattr(pngwrite, "MAX_LEVEL", 9)
    plain = encode_rgb(np.asarray(pixels), level=6)
    assert np.array_equal(_decode(fast), _decode(plain))
    assert np.array_equal(_decode(fast), np.asarray(pixels))
    assert zlib.decompress(_idat(fast)) == zlib.decompress(_idat(plain))  # same filtered rows


def _idat(data: bytes) -> bytes:
    (length,) = struct.unpack(">I", data[33:37])  # IHDR is 8 + 25 bytes; IDAT follows
    assert data[37:41] == b"IDAT"
    return data[41 : 41 + length]


def test_encoder_rejects_what_is_not_8_bit_rgb() -> None:
    for bad in (
        np.zeros((4, 4), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4, 4, 3), np.float32),
        np.zeros((0, 4, 3), np.uint8),
    ):
        with pytest.raises(ValueError, match="uint8"):
            encode_rgb(bad)


def _composited(pixels: np.ndarray, cam: np.ndarray, caption: str) -> np.ndarray:
    """The overlay drawn step by step with Pillow, as xrwatch drew it before its lookup table."""
    size = pixels.shape[0]
    heat = heatmap.heat_image(cam, size)
    colour = heat.copy()
    colour.putpalette(heatmap._LUT.reshape(-1).tolist())
    alpha = heat.point([round(heatmap.ALPHA * v) for v in range(256)])
    grey = Image.fromarray((np.clip(pixels, 0, 1) * 255.0 + 0.5).astype(np.uint8), mode="L")
    image = Image.composite(colour.convert("RGB"), grey.convert("RGB"), alpha)
    if size < heatmap.MIN_SIDE:
        side = size * -(-heatmap.MIN_SIDE // size)
        image = image.resize((side, side), Image.Resampling.NEAREST)
    return np.concatenate([np.asarray(image), heatmap._legend(image.width, caption)])


@pytest.mark.parametrize("size", [7, 64, 96, 224, 320])
def test_lookup_table_overlay_equals_pillows_composite(size: int) -> None:
    rng = np.random.default_rng(size)
    pixels = rng.random((size, size), dtype=np.float32) * 1.2 - 0.1  # also out of [0, 1]
    for cam in (rng.normal(size=(7, 7)), np.zeros((2, 2)), -np.ones((3, 3))):
        cam = cam.astype(np.float32)
        got = heatmap.overlay_pixels(pixels, cam, "CAM for Viral, p=0.42")
        assert np.array_equal(got, _composited(pixels, cam, "CAM for Viral, p=0.42"))


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
    real_encode = heatmap.encode_overlay

    def spy(job: HeatmapJob) -> bytes:
        names.add(threading.current_thread().name)
        return real_encode(job)

    before = set(threading.enumerate())
    with pytest.MonkeyPatch.context() as mp, HeatmapWriter(threads=3) as writer:
        mp.setattr(heatmap, "encode_overlay", spy)
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


@pytest.mark.parametrize("threads", [1, 2])
def test_other_errors_are_raised_after_every_write_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, threads: int
) -> None:
    real_encode = heatmap.encode_overlay

    def buggy(job: HeatmapJob) -> bytes:
        if job.rel == "bug.png":
            raise RuntimeError("a bug")
        return real_encode(job)

    monkeypatch.setattr(heatmap, "encode_overlay", buggy)
    jobs = [_job(tmp_path, name, i) for i, name in enumerate(("bug.png", "x.png", "y.png"))]
    caplog.set_level(logging.ERROR, logger="xrwatch.heatmap")
    with HeatmapWriter(threads) as writer, pytest.raises(RuntimeError, match="a bug"):
        writer.write_many(jobs)
    assert (tmp_path / "x.png.png").is_file() and (tmp_path / "y.png.png").is_file()
    assert "bug.png: cannot draw its heatmap: RuntimeError('a bug')" in caplog.messages


def test_closed_writer_still_writes_in_the_callers_thread(tmp_path: Path) -> None:
    writer = HeatmapWriter(2)
    writer.close()
    paths = writer.write_many([_job(tmp_path, "a.png", 1), _job(tmp_path, "b.png", 2)])
    assert paths == [tmp_path / "a.png.png", tmp_path / "b.png.png"]
    with pytest.raises(ValueError, match="threads"):
        HeatmapWriter(0)


def test_submit_many_writes_batches_in_the_background_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real_encode = heatmap.encode_overlay
    order: list[str] = []

    def encode(job: HeatmapJob) -> bytes:
        if job.rel.startswith("first"):
            gate.wait(10)
        order.append(job.rel)
        if job.rel == "bug.png":
            raise RuntimeError("a bug")
        return real_encode(job)

    monkeypatch.setattr(heatmap, "encode_overlay", encode)
    with HeatmapWriter(2) as writer:
        first = writer.submit_many([_job(tmp_path, "first.png", 1)])
        second = writer.submit_many([_job(tmp_path, "second.png", 2)])
        assert not first.done() and not second.done()  # the caller was not held up
        gate.set()
        assert first.result(10) == [tmp_path / "first.png.png"]
        assert second.result(10) == [tmp_path / "second.png.png"]
        assert order == ["first.png", "second.png"]  # batches one after another, in order
        failing = writer.submit_many([_job(tmp_path, "bug.png", 3)])
        with pytest.raises(RuntimeError, match="a bug"):
            failing.result(10)
    after = writer.submit_many([_job(tmp_path, "late.png", 4)])  # closed: written at once
    assert after.done() and after.result() == [tmp_path / "late.png.png"]


def test_map_is_scaled_min_to_max() -> None:
    """Values all alike (a 2 x 2 grid on a real image) still span the colour scale."""
    cam = np.array([[5.0, 5.2], [5.1, 5.3]], dtype=np.float32)
    heat = np.asarray(heatmap.heat_image(cam, 2))
    assert heat.min() == 0 and heat.max() == 255
    assert heat[0, 0] < heat[1, 0] < heat[0, 1] < heat[1, 1]
    assert np.asarray(heatmap.heat_image(np.full((2, 2), 3.0), 4)).max() == 0  # flat: no heat


def _flagged(flag: str, size: int = 64) -> tuple[HeatmapJob, np.ndarray]:
    rng = np.random.default_rng(5)
    job = HeatmapJob(
        root=Path("/unused"), rel="x", pixels=rng.random((size, size), dtype=np.float32),
        cam=rng.normal(size=(4, 4)).astype(np.float32), label="Virus", confidence=0.61,
        flag=flag,
    )  # fmt: skip
    return job, heatmap.job_pixels(job)


@pytest.mark.parametrize("size", [64, 224])
def test_a_flagged_overlay_says_so_in_a_banner(size: int) -> None:
    _, plain = _flagged("", size)
    side = plain.shape[1]
    assert plain.shape[0] == side + heatmap.LEGEND_HEIGHT  # not flagged: no banner
    for flag, colour in ((flags.LOW_CONFIDENCE, (200, 120, 0)), (flags.OUT_OF_SCOPE, (170, 0, 0))):
        _, pixels = _flagged(flag, size)
        top = heatmap.LEGEND_HEIGHT
        assert pixels.shape == (top + side + heatmap.LEGEND_HEIGHT, side, 3)
        banner = pixels[:top].reshape(-1, 3)
        assert (banner == colour).all(axis=1).mean() > 0.6  # the colour, with white text
        assert (banner.min(axis=1) > 200).sum() > 50  # white text on it
        expected_text, _ = heatmap.banner_of(flag, "Virus", 0.61) or ("", None)
        assert expected_text.startswith(flag.upper().replace("_", " "))
        if flag == flags.LOW_CONFIDENCE:  # the map is drawn as for any result
            assert np.array_equal(pixels[top:], plain)
    assert "Virus" in (heatmap.banner_of(flags.LOW_CONFIDENCE, "Virus", 0.61) or ("",))[0]


def test_out_of_scope_draws_no_class_map() -> None:
    _, pixels = _flagged(flags.OUT_OF_SCOPE)
    top, side = heatmap.LEGEND_HEIGHT, pixels.shape[1]
    image = pixels[top : top + side].astype(int)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert heatmap.caption_of("Virus", 0.61, flags.OUT_OF_SCOPE).startswith("no class map")
    assert "Virus" not in heatmap.caption_of("Virus", 0.61, flags.OUT_OF_SCOPE)
    legend = pixels[top + side :]
    coloured = (legend.max(axis=2).astype(int) - legend.min(axis=2)) > 30
    assert not coloured.any()  # no colour scale in the legend either


def test_every_flag_gets_a_banner_and_the_unreadable_ones_no_map() -> None:
    for flag in flags.FLAGS:
        if not flag:
            continue
        _, pixels = _flagged(flag)
        top, side = heatmap.LEGEND_HEIGHT, pixels.shape[1]
        assert pixels.shape[0] == top + side + heatmap.LEGEND_HEIGHT, flag
        image = pixels[top : top + side].astype(int)
        grey = bool((image.max(axis=2) == image.min(axis=2)).all())
        assert grey == (flag in heatmap.NO_MAP_FLAGS), flag
    assert flags.OUT_OF_POPULATION in heatmap.NO_MAP_FLAGS
    text, colour = heatmap.banner_of("some_new_flag", "Virus", 0.5) or ("", None)
    assert text == "SOME NEW FLAG" and colour == heatmap.OTHER_BANNER
