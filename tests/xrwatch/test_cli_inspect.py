"""``xrwatch inspect``: tables, JSON, previews and the exit status."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.dicom_factory import gradient, write_dicom
from xrwatch.cli import main


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "in"
    d.mkdir()
    dcm = write_dicom(
        d / "chest.dcm",
        pixels=gradient(40, 30),
        photometric="MONOCHROME1",
        patient_name="Hidden^Person",
        sop_instance_uid="1.2.826.0.1.99",
    )
    png = d / "film.png"
    Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (20, 1))).save(png)
    bad = d / "notes.txt"
    bad.write_text("not an image\n")
    return {"dcm": dcm, "png": png, "bad": bad}


def test_json_output_and_exit_status(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["inspect", "--json", str(files["dcm"]), str(files["png"])])
    assert code == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert [d["status"] for d in data] == ["ok", "ok"]
    dcm, png = data
    assert dcm["kind"] == "dicom" and (dcm["width"], dcm["height"]) == (30, 40)
    assert dcm["photometric"] == "MONOCHROME1" and dcm["modality"] == "DX"
    assert dcm["transfer_syntax"] == "1.2.840.10008.1.2.1"
    assert dcm["transfer_syntax_name"] == "Explicit VR Little Endian"
    assert dcm["sop_instance_uid"] == "1.2.826.0.1.99"
    assert dcm["min"] == 0.0 and dcm["max"] == 1.0 and 0.0 < dcm["mean"] < 1.0
    assert dcm["decode_ms"] >= 0.0
    assert png["kind"] == "png" and png["width"] == 50 and png["max"] == pytest.approx(245 / 255)
    assert "Hidden" not in out


def test_a_failed_file_gives_exit_1_and_its_reason(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["inspect", "--json", str(files["png"]), str(files["bad"])])
    assert code == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data[0]["status"] == "ok"
    assert data[1]["status"] == "error" and data[1]["error_type"] == "UnsupportedImageError"
    assert "not a DICOM, PNG or JPEG" in data[1]["error"]
    assert "notes.txt" in captured.err


def test_tables_show_each_file(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", str(files["dcm"]), str(files["bad"])])
    assert code == 1
    out = capsys.readouterr().out
    for needle in ("chest.dcm", "MONOCHROME1", "Explicit VR Little Endian", "DX", "notes.txt"):
        assert needle in out
    assert "2 file(s), 1 failed" in out


def test_preview_is_the_model_input(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "previews"
    code = main(["inspect", "--preview", str(out_dir), "--size", "64", str(files["dcm"].parent)])
    assert code == 1  # notes.txt in the folder fails; the images still get previews
    capsys.readouterr()
    preview = out_dir / "chest.png"
    assert sorted(p.name for p in out_dir.iterdir()) == ["chest.png", "film.png"]
    with Image.open(preview) as img:
        assert img.mode == "L" and img.size == (64, 64)
        arr = np.asarray(img)
    # MONOCHROME1 ramp: low stored values (top-left) are bright
    assert arr[0, 0] > 240 and arr[-1, -1] < 15


def test_preview_names_do_not_collide(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_dicom(a / "x.dcm")
    write_dicom(b / "x.dcm")
    assert main(["inspect", "--json", "--preview", str(tmp_path / "p"), str(a), str(b)]) == 0
    names = [Path(d["preview"]).name for d in json.loads(capsys.readouterr().out)]
    assert names == ["x.png", "x-2.png"]


def test_bad_size_is_a_usage_error(files: dict[str, Path]) -> None:
    assert main(["inspect", "--size", "3", str(files["png"])]) == 2


def test_file_names_with_brackets_are_shown_as_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rich must not take ``[study]`` or ``[red]`` in a file name for markup and drop it."""
    folder = tmp_path / "[study]"
    folder.mkdir()
    bad = folder / "[red]scan.png"
    bad.write_text("not an image\n")
    assert main(["inspect", str(bad)]) == 1
    out, err = (text.replace("\n", "") for text in capsys.readouterr())  # long paths fold
    assert str(bad) in out
    assert f"{bad}:" in err


def test_a_reduced_jpeg_2000_decode_is_not_called_draft_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pydicom.uid import JPEG2000Lossless

    y, x = np.mgrid[0:512, 0:512]
    pixels = (2000 + 1000 * np.sin(x / 37.0) * np.cos(y / 53.0)).astype(np.uint16)
    path = write_dicom(
        tmp_path / "j.dcm", pixels=pixels, bits_stored=12, transfer_syntax=JPEG2000Lossless
    )
    assert main(["inspect", "--size", "64", str(path)]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "reduced resolution" in out and "draft" not in out
