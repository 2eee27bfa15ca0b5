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
    from xrwatch.serve.reports import csv_cell

    # each cell quoted as the daemon's report quotes it (control characters may be escaped)
    assert sorted(r["file"] for r in rows) == sorted(csv_cell(n) for n in names)
    assert all(r["file"].startswith("'") for r in rows)  # a spreadsheet shows them as text
    assert all(float(r["confidence"]) > 0 for r in rows)  # numbers stay numbers
    code, out, _ = run(
        ["classify", "--model", str(tiny_onnx_model), "--format", "json", "--", *names], capsys
    )
    assert sorted(r["file"] for r in json.loads(out)) == sorted(names)  # JSON stays exact
    assert csv_cell("-0.5") == "'-0.5" and csv_cell(-0.5) == "-0.500000" and csv_cell(3) == "3"
    assert csv_cell("a=b") == "a=b" and csv_cell("\rx") == "' x"


def test_an_unreadable_file_given_directly_is_one_error_row(
    folder: Path,
    tiny_onnx_model: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a usage error (exit 2) that stops every other file: exit 1 and an error row."""
    import os

    locked = folder / "a.png"
    if os.geteuid() == 0:  # root reads any file: deny it as the kernel would for a user
        import xrwatch.filebatches

        real_access, real_read = os.access, xrwatch.filebatches.read_and_hash

        def access(path: object, mode: int, *args: object, **kw: object) -> bool:
            return False if Path(str(path)) == locked else real_access(path, mode, *args, **kw)  # type: ignore[arg-type]

        def read_and_hash(path: object, *args: object) -> object:
            if Path(str(path)) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_read(path, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "access", access)
        monkeypatch.setattr(xrwatch.filebatches, "read_and_hash", read_and_hash)
    else:
        locked.chmod(0)
    other = folder / "sub" / "b.png"
    code, out, err = run(
        ["classify", str(locked), str(other), "--model", str(tiny_onnx_model), "-f", "csv"],
        capsys,
    )
    assert code == EXIT_FAILED, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["file"], r["status"]) for r in rows] == [(str(locked), "error"), (str(other), "ok")]
    assert "Permission denied" in rows[0]["error"]


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_rows_are_printed_batch_by_batch_as_one_document(
    fmt: str, folder: Path, tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Each batch is printed when it is classified (before the next is read), and the whole
    output is still one CSV (one header), one JSON list or one table (one header)."""
    import xrwatch.engine

    printed_before: list[str] = []
    real = xrwatch.engine.InferenceEngine.predict_paths

    def spy(self: object, paths: list[Path], *args: object, **kw: object) -> object:
        printed_before.append(capsys.readouterr().out)  # what was out before this batch
        return real(self, paths, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(xrwatch.engine.InferenceEngine, "predict_paths", spy)
    code = main(
        ["classify", str(folder), "--model", str(tiny_onnx_model), "-f", fmt, "--batch-size", "1"]
    )
    out = "".join(printed_before) + capsys.readouterr().out
    assert code == EXIT_FAILED
    assert len(printed_before) == 3  # one call per batch of one
    assert printed_before[0] == "" and "a.png" in printed_before[1] and "b.png" in printed_before[2]
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [Path(r["file"]).name for r in rows] == ["a.png", "b.png", "broken.jpg"]
    elif fmt == "json":
        assert [Path(r["file"]).name for r in json.loads(out)] == ["a.png", "b.png", "broken.jpg"]
    else:
        assert out.count("confidence") == 1 and out.count("broken.jpg") == 1


def test_no_progress_bar_into_a_pipe(
    folder: Path, tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["classify", str(folder), "--model", str(tiny_onnx_model)], capsys)
    assert code == EXIT_FAILED
    assert "classifying" not in out + err and "\x1b[" not in out + err


def test_progress_bar_on_a_terminal(folder: Path, tiny_onnx_model: Path) -> None:
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    command = [sys.executable, "-m", "xrwatch", "classify", str(folder), "--batch-size", "1"]
    env = {**os.environ, "COLUMNS": "300", "TERM": "xterm"}  # wide: no name is folded
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [*command, "--model", str(tiny_onnx_model)], stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=120) == EXIT_FAILED
    text = out.decode("utf-8", "replace")
    assert "classifying" in text and "/3" in text  # the bar, counting the three files
    assert "a.png" in text and "broken.jpg" in text


def test_csv_puts_the_flag_next_to_the_label() -> None:
    from xrwatch.cli.classify_cmd import csv_header

    header = csv_header(CLASSES)
    assert header[header.index("label") + 1] == "flag"
