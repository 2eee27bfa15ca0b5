"""``xrwatch demo`` end to end, as a newcomer runs it (needs the train extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from serve_harness import ROOT, assert_csv_intact

from xrwatch.cli._app import EXIT_ERROR, main
from xrwatch.cli.demo_cmd import DEMO_ENTRIES, remove_demo_files


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    work = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "xrwatch", "demo", "--workdir", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "daemon stopped cleanly" in r.stdout
    # --no-keep removes DEMO_ENTRIES: they must name everything the demo creates
    assert set(p.name for p in work.iterdir()) <= set(DEMO_ENTRIES)
    rows = assert_csv_intact(work / "reports")
    assert len(rows) == 9
    errors = [row for row in rows if row["status"] == "error"]
    assert [e["file"] for e in errors] == ["not-an-xray.png"]
    dicoms = [row for row in rows if row["file"].endswith(".dcm")]
    assert len(dicoms) == 4 and all(d["accession_number"].startswith("DEMO") for d in dicoms)
    for path in (work / "reports").rglob("*"):
        if path.is_file():
            assert b"Demo^Synthetic" not in path.read_bytes(), path
    assert "Demo^Synthetic" not in r.stdout + r.stderr


def test_demo_refuses_a_folder_that_holds_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    mine = tmp_path / "my-notes.txt"
    mine.write_text("the user's own file")
    assert main(["demo", "--workdir", str(tmp_path), "--no-keep"]) == EXIT_ERROR
    assert "not empty" in capsys.readouterr().err
    assert mine.read_text() == "the user's own file"
    assert [p.name for p in tmp_path.iterdir()] == ["my-notes.txt"]


def test_no_keep_removes_only_what_the_demo_created(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    for name in DEMO_ENTRIES:
        if "." in name:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text("demo")
        else:
            (work / name / "sub").mkdir(parents=True)
            (work / name / "sub" / "f").write_text("demo")
    (work / "dropped-meanwhile.txt").write_text("the user's")  # not the demo's: stays
    remove_demo_files(work, created=True)
    assert [p.name for p in work.iterdir()] == ["dropped-meanwhile.txt"]
    (work / "dropped-meanwhile.txt").unlink()
    remove_demo_files(work, created=False)  # an empty folder the user gave: kept
    assert work.is_dir()
    remove_demo_files(work, created=True)  # the demo's own folder, now empty: removed
    assert not work.exists()
