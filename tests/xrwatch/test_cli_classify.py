"""``xrwatch classify``: one result per file in table, CSV and JSON; exit 1 on any failure."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xrwatch.cli._app import EXIT_ERROR, EXIT_FAILED, EXIT_OK, main

CLASSES = ["Normal", "Bacteria", "Virus", "COVID-19"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A nested folder of two generated PNGs and one broken JPEG."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    ramp = (np.linspace(0, 255, 80 * 60).reshape(60, 80)).astype(np.uint8)
    Image.fromarray(ramp).save(root / "a.png")
    Image.fromarray(ramp.T.copy()).save(root / "sub" / "b.png")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 40)
    return root


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output(
    folder: Path, tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        ["classify", str(folder), "--model", str(tiny_onnx_model), "-f", "json"], capsys
    )
    assert code == EXIT_FAILED  # broken.jpg failed
    rows = json.loads(out)
    assert [Path(r["file"]).name for r in rows] == ["a.png", "b.png", "broken.jpg"]
    model_sha = hashlib.sha256(tiny_onnx_model.read_bytes()).hexdigest()
    for row in rows:
        assert {
            "file",
            "status",
            "label",
            "confidence",
            "probabilities",
            "error",
            "sha256",
            "model_sha256",
        } <= set(row)
        assert row["model_sha256"] == model_sha
        assert row["sha256"] == hashlib.sha256(Path(row["file"]).read_bytes()).hexdigest()
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2
    for row in ok:
        assert list(row["probabilities"]) == CLASSES
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
        assert row["confidence"] == pytest.approx(max(row["probabilities"].values()))
        assert row["error"] is None
    broken = rows[2]
    assert broken["status"] == "error" and broken["label"] is None and broken["error"]


def test_csv_output(
    folder: Path, tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        ["classify", str(folder), "--model", str(tiny_onnx_model), "--format", "csv"], capsys
    )
    assert code == EXIT_FAILED
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3
    assert {f"prob_{c}" for c in CLASSES} <= set(rows[0])
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    for r in rows[:2]:
        probs = [float(r[f"prob_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert r["label"] == CLASSES[int(np.argmax(probs))]
    assert rows[2]["error"] and rows[2]["prob_Normal"] == ""


def test_table_output_and_exit_zero_when_all_ok(
    folder: Path, tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "sub" / "broken.jpg").unlink()
    code, out, _ = run(["classify", str(folder), "--model", str(tiny_onnx_model)], capsys)
    assert code == EXIT_OK
    assert "a.png" in out and "b.png" in out
    assert out.count(" ok ") == 2
    for c in CLASSES:
        assert c in out


def test_real_images_one_result_each(
    shared_xray: Path, tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        [
            "classify",
            str(shared_xray / "real"),
            str(shared_xray / "dicom"),
            "--model",
            str(tiny_onnx_model),
            "-f",
            "json",
            "--batch-size",
            "16",
            "--threads",
            "1",
        ],
        capsys,
    )
    rows = json.loads(out)
    expected = [
        p for d in ("real", "dicom") for p in sorted((shared_xray / d).rglob("*")) if p.is_file()
    ]
    assert [r["file"] for r in rows] == [str(p) for p in expected]
    assert code == (EXIT_FAILED if any(r["status"] == "error" for r in rows) else EXIT_OK)
    assert sum(r["status"] == "ok" for r in rows) >= len(expected) - 1


def test_model_without_metadata_is_a_usage_error(
    folder: Path, tiny_onnx_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(tiny_onnx_model))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    code, _, err = run(["classify", str(folder), "--model", str(bare)], capsys)
    assert code == EXIT_ERROR
    assert "bare.onnx" in err and "xrwatch.classes" in err


def test_require_gpu_on_a_cpu_machine(
    folder: Path, tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.xrwatch.test_engine import has_gpu

    if has_gpu():
        pytest.skip("a usable GPU is present")
    code, out, err = run(
        ["classify", str(folder), "--model", str(tiny_onnx_model), "--require-gpu"], capsys
    )
    assert code == EXIT_ERROR
    assert "GPU" in err and out == ""


def test_no_files_found(
    tmp_path: Path, tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["classify", str(tmp_path), "--model", str(tiny_onnx_model)], capsys)
    assert code == EXIT_ERROR and "no files" in err


def test_cpu_and_require_gpu_contradict(
    folder: Path, tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["classify", str(folder), "--model", str(tiny_onnx_model), "--cpu", "--require-gpu"]
    code, _, err = run(argv, capsys)
    assert code == EXIT_ERROR and "contradict" in err


def test_cpu_flag_runs_on_cpu(
    folder: Path, tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["classify", str(folder / "a.png"), "--model", str(tiny_onnx_model), "--cpu"]
    argv += ["-f", "json", "--log-level", "INFO"]
    code, out, err = run(argv, capsys)
    assert code == EXIT_OK and json.loads(out)[0]["status"] == "ok"
    assert "CPUExecutionProvider" in err  # the provider that actually ran is logged


def test_table_shows_file_names_with_brackets(
    tmp_path: Path, tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    ramp = (np.linspace(0, 255, 80 * 60).reshape(60, 80)).astype(np.uint8)
    Image.fromarray(ramp).save(folder / "[bold]a.png")
    (folder / "[red]b.png").write_text("not an image")
    code, out, _ = run(["classify", str(folder), "--model", str(tiny_onnx_model)], capsys)
    assert code == EXIT_FAILED
    assert "[bold]a.png" in out and "[red]b.png" in out


def test_csv_is_one_line_per_file_and_formats_like_the_daemon_report() -> None:
    from xrwatch.cli.classify_cmd import render_csv
    from xrwatch.engine import Prediction

    preds = [
        Prediction("a.png", "ok", "Normal", 0.75, {"Normal": 0.75, "Virus": 0.25}),
        Prediction("b.dcm", "error", error="pixel data does not decode:\nline two"),
    ]
    lines = render_csv(preds, ["Normal", "Virus"]).splitlines()
    assert len(lines) == 3  # header + one line per file, even with a multi-line reason
    rows = list(csv.DictReader(lines))
    assert rows[0]["confidence"] == "0.750000" and rows[0]["prob_Virus"] == "0.250000"
    assert rows[1]["error"] == "pixel data does not decode: line two"
    assert rows[1]["prob_Normal"] == "" and rows[1]["label"] == ""


def test_csv_neutralises_spreadsheet_formulas_in_text_cells(
    tmp_path: Path,
    tiny_onnx_model: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = ["=HYPERLINK(1).png", "+1.png", "-1.png", "@SUM(A1).png", "\tx.png"]
    for i, name in enumerate(names):
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)  # relative names: the file cell starts with the name itself
    code, out, _ = run(
        ["classify", "--model", str(tiny_onnx_model), "--format", "csv", "--", *names], capsys
    )
    assert code == EXIT_OK
    rows = list(csv.DictReader(io.StringIO(out)))
    assert sorted(r["file"] for r in rows) == sorted("'" + n for n in names)
    assert all(float(r["confidence"]) > 0 for r in rows)  # numbers stay numbers
    code, out, _ = run(
        ["classify", "--model", str(tiny_onnx_model), "--format", "json", "--", *names], capsys
    )
    assert sorted(r["file"] for r in json.loads(out)) == sorted(names)  # JSON stays exact
    from xrwatch.serve.reports import csv_cell

    assert csv_cell("-0.5") == "'-0.5" and csv_cell(-0.5) == "-0.500000" and csv_cell(3) == "3"
    assert csv_cell("a=b") == "a=b" and csv_cell("\rx") == "' x"
