"""Every real file under ../shared/data/xray (dicom/ and real/) decodes to [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xrwatch.imageio import read_image

# Shapes (rows, columns) from ../shared/data/xray/README.md
DICOM_SHAPES = {
    "CR-MONO1-10-chest.dcm": (440, 440),
    "RG1_J2KI.dcm": (1955, 1841),
    "highdicom_dx_image_canine_thorax.dcm": (169, 211),
    "nih_DX_NoFinding_": (1024, 1024),
    "rsna_": (1024, 1024),
}


def _expected_shape(name: str) -> tuple[int, int]:
    for prefix, shape in DICOM_SHAPES.items():
        if name.startswith(prefix):
            return shape
    raise AssertionError(f"{name} is not listed in the shared data README")


def _check(pixels: np.ndarray) -> None:
    assert pixels.dtype == np.float32 and pixels.ndim == 2
    assert np.isfinite(pixels).all()
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert pixels.std() > 0.05  # an image, not a flat field


def test_every_shared_dicom_decodes(real_dicoms: list[Path]) -> None:
    assert len(real_dicoms) >= 5
    for path in real_dicoms:
        decoded = read_image(path)
        _check(decoded.pixels)
        assert decoded.pixels.shape == _expected_shape(path.name), path.name
        meta = decoded.meta
        assert meta.kind == "dicom" and meta.transfer_syntax
        assert (meta.height, meta.width) == decoded.pixels.shape
        assert meta.photometric in ("MONOCHROME1", "MONOCHROME2")
        assert meta.sop_instance_uid


def test_implicit_file_without_transfer_syntax_decodes(shared_xray: Path) -> None:
    decoded = read_image(shared_xray / "dicom" / "CR-MONO1-10-chest.dcm")
    assert decoded.meta.transfer_syntax == "1.2.840.10008.1.2"  # inferred: implicit VR LE


def test_monochrome1_chest_is_shown_bright_where_dense(shared_xray: Path) -> None:
    # In a PA chest film the lungs (centre-left/right) are dark, the mediastinum and the
    # surroundings of the chest brighter; MONOCHROME1 must come out the same way round.
    for name in ("CR-MONO1-10-chest.dcm", "RG1_J2KI.dcm"):
        px = read_image(shared_xray / "dicom" / name).pixels
        h, w = px.shape
        lungs = np.concatenate(
            [
                px[int(h * 0.3) : int(h * 0.6), int(w * 0.2) : int(w * 0.35)].ravel(),
                px[int(h * 0.3) : int(h * 0.6), int(w * 0.65) : int(w * 0.8)].ravel(),
            ]
        )
        spine = px[int(h * 0.3) : int(h * 0.6), int(w * 0.45) : int(w * 0.55)]
        assert float(np.median(lungs)) < float(np.median(spine)), name


def test_every_real_raster_decodes(real_images: list[Path]) -> None:
    assert len(real_images) >= 100
    for path in real_images:
        decoded = read_image(path)
        _check(decoded.pixels)
        with Image.open(path) as img:
            size = img.size
        assert (decoded.meta.width, decoded.meta.height) == size, path.name
        assert decoded.pixels.shape == (size[1], size[0])
        assert decoded.meta.kind == ("png" if path.suffix.lower() == ".png" else "jpeg")


@pytest.mark.parametrize("min_side", [224, 336])
def test_draft_mode_keeps_the_requested_side(real_images: list[Path], min_side: int) -> None:
    jpegs = [p for p in real_images if p.suffix.lower() in (".jpeg", ".jpg")][:20]
    reduced = 0
    for path in jpegs:
        decoded = read_image(path, min_side=min_side)
        assert min(decoded.pixels.shape) >= min_side
        reduced += decoded.meta.decoded_width < decoded.meta.width
    assert reduced > 0


@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "CR-MONO1-10-chest.dcm"])
def test_a_dicom_cut_anywhere_in_its_header_is_truncated_not_invalid(
    shared_xray: Path, tmp_path: Path, name: str
) -> None:
    """A DICOM still being copied can stop at any byte; it must read as truncated (the
    daemon waits for the rest), never as corrupt or as a dataset without pixel data."""
    from xrwatch.errors import TruncatedImageError

    data = (shared_xray / "dicom" / name).read_bytes()
    for cut in range(132, 3000, 7):
        partial = tmp_path / f"{cut}.dcm"
        partial.write_bytes(data[:cut])
        with pytest.raises(TruncatedImageError):
            read_image(partial)
