"""PNG and JPEG reading: bit depths, colour modes, EXIF orientation, truncation, bombs, draft."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.dicom_factory import gradient, write_dicom
from xrwatch.errors import ImageDecodeError, ImageTooLargeError, TruncatedImageError
from xrwatch.imageio import read_image


def _ramp(h: int = 60, w: int = 80) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w), (h, 1)).astype(np.uint8)


def test_png_8bit_gray_is_value_over_255(tmp_path: Path) -> None:
    arr = _ramp()
    Image.fromarray(arr).save(tmp_path / "g.png")
    decoded = read_image(tmp_path / "g.png")
    np.testing.assert_allclose(decoded.pixels, arr / 255.0, atol=1e-6)
    assert decoded.meta.kind == "png" and (decoded.meta.width, decoded.meta.height) == (80, 60)


def test_png_16bit_is_scaled_by_its_real_range(tmp_path: Path) -> None:
    arr = np.tile(np.linspace(1000, 4000, 50), (20, 1)).astype(np.uint16)  # 12-bit data
    Image.fromarray(arr).save(tmp_path / "g16.png")
    px = read_image(tmp_path / "g16.png").pixels
    np.testing.assert_allclose(px, (arr - 1000.0) / 3000.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_modes_become_luminance(tmp_path: Path, mode: str) -> None:
    gray = Image.fromarray(_ramp())
    img = gray.convert(mode)
    img.save(tmp_path / "c.png")
    px = read_image(tmp_path / "c.png").pixels
    assert px.shape == (60, 80)
    np.testing.assert_allclose(px, _ramp() / 255.0, atol=2 / 255)


def test_rgb_luminance_weights(tmp_path: Path) -> None:
    rgb = np.zeros((4, 3, 3), np.uint8)
    rgb[:, 0] = (255, 0, 0)
    rgb[:, 1] = (0, 255, 0)
    rgb[:, 2] = (0, 0, 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    px = read_image(tmp_path / "rgb.png").pixels
    np.testing.assert_allclose(px[0], [0.299, 0.587, 0.114], atol=2 / 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((40, 100), np.uint8)
    arr[:, :10] = 255  # a bright bar on the left
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    img.save(tmp_path / "o.jpg", exif=exif, quality=95)
    decoded = read_image(tmp_path / "o.jpg")
    assert decoded.pixels.shape == (100, 40)
    assert (decoded.meta.width, decoded.meta.height) == (40, 100)
    assert decoded.pixels[:10].mean() > 0.9  # the bar is now on top
    assert decoded.pixels[-50:].mean() < 0.1


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "t.png"), ("JPEG", "t.jpg")])
@pytest.mark.parametrize("keep", [0.95, 0.5])
def test_truncated_file_is_an_error_not_grey(
    tmp_path: Path, fmt: str, name: str, keep: float
) -> None:
    noise = np.random.default_rng(1).integers(0, 255, (200, 200), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, fmt)
    data = buf.getvalue()
    (tmp_path / name).write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(TruncatedImageError, match="truncated") as info:
        read_image(tmp_path / name)
    assert info.value.path == str(tmp_path / name)


def test_corrupt_png_stream_is_a_decode_error(tmp_path: Path) -> None:
    noise = np.random.default_rng(2).integers(0, 255, (100, 100), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\x5a" * 64
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError):
        read_image(tmp_path / "bad.png")


def test_png_with_a_garbage_header_is_a_decode_error(tmp_path: Path) -> None:
    (tmp_path / "h.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(ImageDecodeError, match="cannot be opened as PNG"):
        read_image(tmp_path / "h.png")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit gray pixels but holds one tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("side", "message"),
    [
        (20_000, "decompression bomb"),  # 400 MP: past Pillow's own hard limit
        (10_500, "exceeds the limit of 100,000,000"),  # 110 MP: xrwatch's documented limit
    ],
)
def test_bomb_is_refused_before_allocation(tmp_path: Path, side: int, message: str) -> None:
    (tmp_path / "bomb.png").write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageTooLargeError, match=message) as info:
        read_image(tmp_path / "bomb.png")
    assert info.value.path == str(tmp_path / "bomb.png")


def test_bomb_dicom_is_refused_before_decoding(tmp_path: Path) -> None:
    path = write_dicom(
        tmp_path / "bomb.dcm", pixels=gradient(8, 8), extra={"Rows": 12_000, "Columns": 12_000}
    )
    with pytest.raises(ImageTooLargeError, match="144,000,000 pixels exceeds the limit"):
        read_image(path)


def test_documented_pixel_limit_applies(tmp_path: Path) -> None:
    Image.fromarray(_ramp(100, 100)).save(tmp_path / "s.png")
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 9,999"):
        read_image(tmp_path / "s.png", max_pixels=9_999)
    assert read_image(tmp_path / "s.png", max_pixels=10_000).pixels.shape == (100, 100)


def test_draft_mode_reduces_large_jpeg_but_keeps_min_side(tmp_path: Path) -> None:
    y, x = np.mgrid[0:2000, 0:1600]
    arr = ((np.sin(x / 40.0) + np.cos(y / 55.0) + 2) * 60).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=92)
    full = read_image(tmp_path / "big.jpg")
    draft = read_image(tmp_path / "big.jpg", min_side=336)
    assert full.pixels.shape == (2000, 1600)
    assert draft.pixels.shape == (500, 400)  # 1/4 scale: the smallest that keeps >= 336
    assert (draft.meta.width, draft.meta.height) == (1600, 2000)
    assert (draft.meta.decoded_width, draft.meta.decoded_height) == (400, 500)
    coarse = full.pixels.reshape(500, 4, 400, 4).mean(axis=(1, 3))
    assert np.abs(coarse - draft.pixels).mean() < 0.02  # same picture, fewer pixels
    # a small request on a small image changes nothing; PNG never drafts
    assert read_image(tmp_path / "big.jpg", min_side=1500).pixels.shape == (2000, 1600)
