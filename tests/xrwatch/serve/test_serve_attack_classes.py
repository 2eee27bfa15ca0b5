"""Class names from a model file (#21 item 10): a name with a terminal escape, a comma or
a quote, served by a real ``xrwatch serve``, reaches neither the CSV nor the log raw.
The CSV header names it with ``\\xNN`` escapes, quoted where CSV needs it, and every row
still has the header's number of fields; the JSON report keeps the exact name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from serve_harness import assert_csv_intact, make_png, run_once

CLASSES = ["Normal\x1b[2J\x1b]0;owned\x07", "a,b", 'say "hi"', "Virus\r\nX"]


@pytest.fixture(scope="module")
def hostile_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from tests.helpers.models import make_tiny_onnx

    return make_tiny_onnx(tmp_path_factory.mktemp("hostile") / "model.onnx", classes=CLASSES)


def test_class_names_with_escapes_are_escaped_in_csv_and_logs(
    folders: tuple[Path, Path], hostile_model: Path
) -> None:
    incoming, reports = folders
    for i in range(3):
        make_png(incoming / f"x{i}.png", seed=i)
    result = run_once(incoming, reports, hostile_model, "--log-format", "text")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    raw = (reports / "predictions.csv").read_bytes()
    assert b"\x1b" not in raw and b"\x07" not in raw
    rows = assert_csv_intact(reports)
    with (reports / "predictions.csv").open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh))
    probs = [c for c in header if c.startswith("prob_")]
    assert probs == [
        "prob_Normal\\x1b[2J\\x1b]0;owned\\x07",
        "prob_a,b",
        'prob_say "hi"',
        "prob_Virus\\x0d\\x0aX",
    ]
    assert len(rows) == 3
    for row in rows:
        assert abs(sum(float(row[c]) for c in probs) - 1.0) < 1e-3
    record = json.loads((reports / "json" / "x0.png.json").read_text())
    assert set(record["probabilities"]) == set(CLASSES)  # the JSON keeps the exact names
