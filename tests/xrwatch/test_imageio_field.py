"""DICOM reading defects found in the field (issues 12 and 13): pydicom's own log output,
JPEG extended with Se = 0, Presentation LUT Shape INVERSE, non-finite attributes, the fast
grayscale path against the reference arithmetic, codestream sizes that lie, the decode
memory budget and JPEG 2000 decoded at reduced resolution."""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import config as pydicom_config
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from tests.helpers.dicom_factory import build_dataset, gradient, write_dicom
from tests.helpers.tools import require_tool
from xrwatch.errors import ImageDecodeError, ImageTooLargeError
from xrwatch.imageio import dicom as dicom_reader
from xrwatch.imageio import read_image
from xrwatch.imageio.budget import DecodeBudget
from xrwatch.imageio.codestream import patch_jpeg_scan_end
from xrwatch.imageio.voi import (
    apply_modality_lut,
    apply_voi_lut,
    apply_window,
    robust_normalise,
)
from xrwatch.preprocess import PreprocessSpec

ROOT = Path(__file__).resolve().parents[2]


def _frame(ds: Any) -> bytes:
    return b"".join(list(generate_fragments(ds.PixelData))[1:])


def _corrupt_j2k(tmp_path: Path) -> Path:
    """A JPEG 2000 DICOM whose codestream header is intact but whose data is garbage."""
    path = write_dicom(
        tmp_path / "bad.dcm", pixels=gradient(64, 64), transfer_syntax=JPEG2000Lossless
    )
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([_frame(ds)[:60] + bytes(range(256)) * 2 + b"\xff\xd9"])
    ds.save_as(path)
    return path


# --- issue 12 item 6, issue 13 item 15: pydicom's own logs ----------------------------------


def test_plugin_failures_leave_no_traceback_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _corrupt_j2k(tmp_path)
    with caplog.at_level(logging.DEBUG), pytest.raises(ImageDecodeError, match="does not decode"):
        read_image(path)
    assert not [r for r in caplog.records if r.exc_info], "a traceback reached the log"
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]
    # what pydicom said is kept at DEBUG, with the file's name
    assert any(str(path) in r.getMessage() and "pydicom" in r.getMessage() for r in caplog.records)


def test_cli_stderr_has_the_reason_and_no_traceback(tmp_path: Path) -> None:
    path = _corrupt_j2k(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "xrwatch", "inspect", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "ERROR pydicom" not in run.stderr
    assert "does not decode" in run.stdout + run.stderr


# --- issue 12 item 11: JPEG extended with Se = 0 ---------------------------------------------


def _set_scan_end_zero(frame: bytes) -> bytes:
    sos = frame.index(b"\xff\xda")
    ns = frame[sos + 4]
    se_at = sos + 4 + 1 + 2 * ns + 1
    assert frame[se_at] == 63
    return frame[:se_at] + b"\x00" + frame[se_at + 1 :]


def test_jpeg_extended_with_scan_end_zero_decodes_like_the_original(tmp_path: Path) -> None:
    source = pydicom.data.get_testdata_file("JPGExtended.dcm")
    assert isinstance(source, str)
    ds = pydicom.dcmread(source)
    ds.Modality = "OT"
    ds.save_as(tmp_path / "ok.dcm")
    reference = read_image(tmp_path / "ok.dcm").pixels
    ds.PixelData = encapsulate([_set_scan_end_zero(_frame(ds))])
    ds.save_as(tmp_path / "se0.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "se0.dcm").pixels, reference)


def test_scan_end_patch_leaves_lossless_jpeg_alone() -> None:
    source = pydicom.data.get_testdata_file("SC_rgb_jpeg_gdcm.dcm")  # lossless SV1: Se is 0
    assert isinstance(source, str)
    assert patch_jpeg_scan_end(_frame(pydicom.dcmread(source))) is None


def test_dcmtk_12_bit_extended_with_scan_end_zero_matches_dcmtk(tmp_path: Path) -> None:
    """DCMTK encodes 12-bit JPEG extended; Se is set to 0; DCMTK's own decode of that file,
    written as Explicit VR Little Endian, is the reference."""
    y, x = np.mgrid[0:96, 0:80]
    raw = (2048 + 1500 * np.sin(x / 9.0) * np.cos(y / 13.0)).astype(np.uint16)
    native = write_dicom(tmp_path / "native.dcm", pixels=raw, bits_stored=12, window=(2048, 4000))
    jpeg = tmp_path / "jpeg.dcm"
    dcmcjpeg = require_tool("dcmcjpeg", "dcmtk")
    subprocess.run([dcmcjpeg, "+ee", str(native), str(jpeg)], check=True, timeout=60)
    ds = pydicom.dcmread(jpeg)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    ds.PixelData = encapsulate([_set_scan_end_zero(_frame(ds))])
    ds.save_as(tmp_path / "se0.dcm")
    decoded_by_dcmtk = tmp_path / "dcmtk.dcm"
    dcmdjpeg = require_tool("dcmdjpeg", "dcmtk")
    subprocess.run(
        [dcmdjpeg, "+te", str(tmp_path / "se0.dcm"), str(decoded_by_dcmtk)],
        check=True,
        timeout=60,
    )
    assert pydicom.dcmread(decoded_by_dcmtk).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    ours = read_image(tmp_path / "se0.dcm").pixels
    reference = read_image(decoded_by_dcmtk).pixels
    # two IDCT implementations: within a few 12-bit steps (window width 4000)
    np.testing.assert_allclose(ours, reference, atol=4 / 4000)
    np.testing.assert_allclose(ours, read_image(native).pixels, atol=0.02)  # lossy vs source


# --- issue 12 item 12: Presentation LUT Shape ------------------------------------------------


@pytest.mark.parametrize(
    ("photometric", "shape", "inverted"),
    [
        ("MONOCHROME2", None, False),
        ("MONOCHROME2", "IDENTITY", False),
        ("MONOCHROME2", "INVERSE", True),
        ("MONOCHROME1", None, True),
        ("MONOCHROME1", "INVERSE", True),  # the DX encoding of MONOCHROME1: inverted once
    ],
)
def test_presentation_lut_shape_sets_polarity(
    tmp_path: Path, photometric: str, shape: str | None, inverted: bool
) -> None:
    raw = gradient(32, 40, hi=4095)
    plain = read_image(write_dicom(tmp_path / "p.dcm", pixels=raw, bits_stored=12)).pixels
    extra = {"PresentationLUTShape": shape} if shape else None
    path = write_dicom(
        tmp_path / "s.dcm", pixels=raw, bits_stored=12, photometric=photometric, extra=extra
    )
    expected = 1.0 - plain if inverted else plain
    np.testing.assert_allclose(read_image(path).pixels, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("photometric", "shape"),
    [("MONOCHROME2", None), ("MONOCHROME2", "INVERSE"), ("MONOCHROME1", "INVERSE")],
)
def test_polarity_matches_dcmtk(tmp_path: Path, photometric: str, shape: str | None) -> None:
    raw = gradient(32, 40, hi=4095)
    extra = {"PresentationLUTShape": shape} if shape else None
    path = write_dicom(
        tmp_path / "s.dcm",
        pixels=raw,
        bits_stored=12,
        photometric=photometric,
        window=(2048, 4096),
        extra=extra,
    )
    pgm = tmp_path / "s.pgm"
    dcm2pnm = require_tool("dcm2pnm", "dcmtk")
    subprocess.run(
        [dcm2pnm, "--write-16-bit-pnm", "+Wi", "1", str(path), str(pgm)], check=True, timeout=60
    )
    dcmtk = np.asarray(Image.open(pgm)).astype(np.float64) / 65535.0
    np.testing.assert_allclose(read_image(path).pixels, dcmtk, atol=1e-3)


# --- issue 13 item 12: non-finite attributes and pixels --------------------------------------


@pytest.mark.parametrize(
    ("tag", "keyword", "value"),
    [
        (0x00281053, "RescaleSlope", "NaN"),
        (0x00281052, "RescaleIntercept", "inf"),
        (0x00281051, "WindowWidth", "NaN"),
        (0x00281050, "WindowCenter", "-inf"),
    ],
)
def test_non_finite_scaling_is_an_error_naming_it(
    tmp_path: Path, tag: int, keyword: str, value: str
) -> None:
    ds = build_dataset(pixels=gradient(16, 16), window=(2000, 4000), rescale=(1.0, 0.0))
    with pydicom_config.disable_value_validation():
        ds.add_new(tag, "DS", value)
    path = tmp_path / "n.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageDecodeError, match=keyword) as info:
        read_image(path)
    assert str(info.value.path) == str(path) and "finite" in info.value.reason


def test_float_pixel_data_with_nan_is_an_error(tmp_path: Path) -> None:
    ds = build_dataset(pixels=gradient(8, 8), with_pixel_data=False)
    values = np.linspace(0, 1, 64, dtype=np.float32)
    values[5] = np.nan
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    del ds.PixelRepresentation
    ds.FloatPixelData = values.tobytes()
    ds.save_as(tmp_path / "f.dcm", enforce_file_format=True)
    with pytest.raises(ImageDecodeError, match="non-finite"):
        read_image(tmp_path / "f.dcm")


# --- issue 12 item 13: the fast grayscale path gives the reference result --------------------


def _reference(ds: Any, arr: np.ndarray) -> np.ndarray:
    """The old full-precision path: float64, one step at a time."""
    values = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds:
        out = apply_voi_lut(values, ds.VOILUTSequence[0], signed=bool(ds.PixelRepresentation))
    elif "WindowCenter" in ds:
        function = str(ds.get("VOILUTFunction", "") or "LINEAR")
        out = apply_window(values, float(ds.WindowCenter), float(ds.WindowWidth), function)
    else:
        out = robust_normalise(values)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(out, 0, 1).astype(np.float32)


RNG = np.random.default_rng(7)
_NOISY_12 = (RNG.normal(1800, 600, (120, 90)).clip(0, 4095)).astype(np.uint16)
_SIGNED = (RNG.normal(-200, 700, (80, 60)).clip(-2048, 2047)).astype(np.int16)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pixels": _NOISY_12, "bits_stored": 12},  # robust stretch
        {"pixels": _NOISY_12, "bits_stored": 12, "window": (1500, 1200)},
        {"pixels": _NOISY_12, "bits_stored": 12, "rescale": (0.5, -100), "window": (800, 700)},
        {"pixels": _NOISY_12, "window": (1500.5, 1.0)},  # LINEAR threshold
        {"pixels": _NOISY_12, "window": (1700, 900), "voi_lut_function": "LINEAR_EXACT"},
        {"pixels": _NOISY_12, "window": (1700, 900), "voi_lut_function": "SIGMOID"},
        {"pixels": _NOISY_12, "photometric": "MONOCHROME1", "window": (1600, 2000)},
        {"pixels": _NOISY_12, "rescale": (-1.0, 4095)},  # negative slope, robust
        {"pixels": _SIGNED, "rescale": (1.0, -1024), "window": (-500, 1500)},
        {"pixels": _SIGNED},
        {"pixels": (_NOISY_12 >> 4).astype(np.uint8), "window": (110, 90)},
        {"pixels": _NOISY_12, "voi_lut": (0, 8, list(np.linspace(0, 255, 4096).astype(int)))},
        {
            "pixels": _NOISY_12,
            "modality_lut": (0, 16, list(range(4095, -1, -1))),
            "window": (2000, 3000),
        },
    ],
)
def test_fast_grayscale_equals_the_reference_arithmetic(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    path = write_dicom(tmp_path / "g.dcm", **kwargs)
    ds = pydicom.dcmread(path)
    expected = _reference(ds, ds.pixel_array)
    np.testing.assert_allclose(read_image(path).pixels, expected, atol=1e-4, rtol=0)


def test_native_decode_holds_no_float64_image(tmp_path: Path) -> None:
    """The old path held several float64 copies (8 bytes/pixel each) at once."""
    raw = (RNG.normal(2000, 500, (1000, 1000)).clip(0, 4095)).astype(np.uint16)
    path = write_dicom(tmp_path / "big.dcm", pixels=raw, bits_stored=12, rescale=(1.0, -10))
    read_image(path)  # warm-up: imports
    tracemalloc.start()
    try:
        read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # file bytes and decoded copies (2 MB each) + the float32 result (4 MB): ~12 MB; the
    # float64 path peaked at 28 MB
    assert peak < 20 * 1_000_000, f"peak {peak / 1e6:.1f} MB"


# --- issue 13 item 13: codestream sizes checked before decoding; a memory budget -------------


def _j2k_with_siz(tmp_path: Path, width: int, height: int) -> Path:
    path = write_dicom(
        tmp_path / "j.dcm", pixels=gradient(128, 128), transfer_syntax=JPEG2000Lossless
    )
    ds = pydicom.dcmread(path)
    frame = bytearray(_frame(ds))
    assert frame[:4] == b"\xff\x4f\xff\x51"
    frame[8:16] = struct.pack(">II", width, height)  # Xsiz, Ysiz (offsets are 0)
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(path)
    return path


def test_j2k_codestream_larger_than_the_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _j2k_with_siz(tmp_path, 16000, 16000)
    assert path.stat().st_size < 20_000
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match=r"16000x16000.*SIZ|SIZ.*16000x16000"):
            read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_j2k_codestream_larger_than_its_header_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="1000x1000 but the DICOM header says 128x128"):
        read_image(_j2k_with_siz(tmp_path, 1000, 1000))


def test_jpeg_sof_larger_than_its_header_is_refused(tmp_path: Path) -> None:
    source = pydicom.data.get_testdata_file("JPGExtended.dcm")
    assert isinstance(source, str)
    ds = pydicom.dcmread(source)
    ds.Modality = "OT"
    frame = bytearray(_frame(ds))
    sof = frame.index(b"\xff\xc1")
    frame[sof + 5 : sof + 9] = struct.pack(">HH", 9000, 9000)  # height, width
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(tmp_path / "sof.dcm")
    with pytest.raises(ImageDecodeError, match="SOF"):
        read_image(tmp_path / "sof.dcm")


def test_budget_lets_one_oversized_request_run_alone() -> None:
    budget = DecodeBudget(100)
    order: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def first() -> None:
        with budget.reserve(80):
            order.append("first in")
            first_in.set()
            release_first.wait(10)
            order.append("first out")

    def second() -> None:
        first_in.wait(10)
        with budget.reserve(500):  # larger than the whole budget: waits for an empty budget
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    first_in.wait(10)
    time.sleep(0.05)  # give the second a chance to (wrongly) enter
    release_first.set()
    for t in threads:
        t.join(10)
    assert order == ["first in", "first out", "second in"]
    assert budget.in_use_bytes == 0


def _most_at_once(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, path: Path) -> int:
    """How many of 4 concurrent ``read_image(path)`` were inside ``module.name`` at once
    (slowed down so that overlaps would show)."""
    running, most = [0], [0]
    lock = threading.Lock()
    real = getattr(module, name)

    def slow(*args: Any) -> Any:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        try:
            return real(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(module, name, slow)
    threads = [threading.Thread(target=read_image, args=(path,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return most[0]


def test_concurrent_decodes_are_bounded_by_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_dicom(tmp_path / "a.dcm", pixels=gradient(64, 64))
    monkeypatch.setattr(dicom_reader, "DECODE_BUDGET", DecodeBudget(1))  # room for one at a time
    # the grey mapping runs inside the reservation, as decoding does
    assert _most_at_once(monkeypatch, dicom_reader, "grey_from_monochrome", path) == 1


def test_service_unit_sets_memory_max() -> None:
    unit = (ROOT / "deploy" / "xrwatch.service").read_text()
    assert any(line.startswith("MemoryMax=") for line in unit.splitlines())
    assert "XRWATCH_DECODE_MEMORY_MB" in unit


# --- issue 12 item 13: JPEG 2000 at reduced resolution ---------------------------------------


def _chest_like(rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    img = 2000 + 1200 * np.sin(x / 37.0) * np.cos(y / 53.0) + 300 * np.sin(y / 15.0)
    return img.clip(0, 4095).astype(np.uint16)


@pytest.mark.parametrize(("rows", "cols"), [(1024, 1024), (1001, 999)])
def test_j2k_decodes_at_reduced_resolution_for_a_small_model(
    tmp_path: Path, rows: int, cols: int
) -> None:
    path = write_dicom(
        tmp_path / "j.dcm",
        pixels=_chest_like(rows, cols),
        bits_stored=12,
        window=(2000, 3000),
        transfer_syntax=JPEG2000Lossless,
    )
    spec = PreprocessSpec()  # 224 px model, min_decode_side 336
    full = read_image(path)
    reduced = read_image(path, min_side=224)
    # two levels skipped: ceil(side / 4) >= 224, ceil(side / 8) < 224
    assert reduced.pixels.shape == (-(-rows // 4), -(-cols // 4))
    assert (reduced.meta.decoded_height, reduced.meta.decoded_width) == reduced.pixels.shape
    assert (reduced.meta.height, reduced.meta.width) == (rows, cols)
    assert read_image(path, min_side=spec.min_decode_side).pixels.shape[0] == -(-rows // 2)
    # the model input hardly changes (JPEG draft mode: ~0.3-0.5/255 on real JPEGs)
    for side, limit in ((224, 0.6), (spec.min_decode_side, 0.3)):
        reduced_input = spec.apply(read_image(path, min_side=side).pixels)
        diff = float(np.abs(reduced_input - spec.apply(full.pixels)).mean()) * 255
        assert diff < limit, f"min_side {side}: model input differs by {diff:.2f}/255"


def test_concurrent_png_decodes_share_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xrwatch.imageio import raster

    path = tmp_path / "a.png"
    Image.fromarray((gradient(64, 64, hi=255)).astype(np.uint8)).save(path)
    monkeypatch.setattr(raster, "DECODE_BUDGET", DecodeBudget(1))
    assert _most_at_once(monkeypatch, raster, "_to_unit_float", path) == 1
