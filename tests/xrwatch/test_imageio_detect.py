"""Format detection from the bytes, and the errors for files that are no image at all."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from tests.helpers.dicom_factory import gradient, write_dicom
from xrwatch.errors import ImageDecodeError, ImageError, UnsupportedImageError
from xrwatch.imageio import read_image, sniff_format


def test_formats_from_bytes_not_extension(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "b.png").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    write_dicom(tmp_path / "c.jpg")
    write_dicom(tmp_path / "d", preamble=False)
    assert sniff_format(tmp_path / "a.dcm") == "png"
    assert sniff_format(tmp_path / "b.png") == "jpeg"
    assert sniff_format(tmp_path / "c.jpg") == "dicom"
    assert sniff_format(tmp_path / "d") == "dicom"


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b"", "empty file"),
        (b"patient,finding\nx,normal\n", "found text"),
        (bytes(range(256)) * 4, "found binary data"),
        (b"GIF89a" + b"\x00" * 200, "found"),
    ],
)
def test_non_images_are_unsupported(tmp_path: Path, content: bytes, found: str) -> None:
    path = tmp_path / "scan.dcm"
    path.write_bytes(content)
    with pytest.raises(UnsupportedImageError, match=found) as info:
        read_image(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(UnsupportedImageError, match="directory"):
        read_image(tmp_path)


def test_dicm_marker_with_garbage_is_a_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "g.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 300)
    with pytest.raises(ImageDecodeError):
        read_image(path)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless])
def test_random_corruption_raises_only_image_errors(tmp_path: Path, syntax: str) -> None:
    raw = write_dicom(tmp_path / "src.dcm", pixels=gradient(32, 32), transfer_syntax=syntax)
    data = raw.read_bytes()
    rng = random.Random(7)
    outcomes: set[str] = set()
    for i in range(120):
        broken = bytearray(data)
        if i % 3 == 0:
            broken = broken[: rng.randrange(132, len(broken))]
        else:
            for _ in range(rng.randrange(1, 8)):
                broken[rng.randrange(132, len(broken))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(bytes(broken))
        try:
            pixels = read_image(path).pixels
        except ImageError as exc:  # anything else is a bug
            assert exc.path == str(path)
            outcomes.add(type(exc).__name__)
        else:
            assert pixels.min() >= 0.0 and pixels.max() <= 1.0
            outcomes.add("ok")
    assert "TruncatedImageError" in outcomes
