"""``xrwatch demo`` end to end, as a newcomer runs it (needs the train extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from serve_harness import ROOT, assert_csv_intact


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
    rows = assert_csv_intact(work / "reports")
    assert len(rows) == 9
    errors = [row for row in rows if row["status"] == "error"]
    assert [e["file"] for e in errors] == ["not-an-xray.png"]
    dicoms = [row for row in rows if row["file"].endswith(".dcm")]
    assert len(dicoms) == 4 and all(d["AccessionNumber"].startswith("DEMO") for d in dicoms)
    for path in (work / "reports").rglob("*"):
        if path.is_file():
            assert b"Demo^Synthetic" not in path.read_bytes(), path
    assert "Demo^Synthetic" not in r.stdout + r.stderr
