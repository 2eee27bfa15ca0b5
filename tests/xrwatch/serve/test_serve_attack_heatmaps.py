"""Heatmaps that cannot be written (#21 item 9), against a real ``xrwatch serve``.

A folder in the way of ``REPORTS/heatmaps/x.png.png`` (as a full disk, it makes the write
fail) used to lose the overlay for good: the result was recorded at once without it, and
its DICOM SR went without its overlay. Now the result is held back (no row, no SR) and its
heatmap retried like a report; once the way is clear it is recorded with its heatmap.
With ``--once`` the retries are few, and the result is then recorded without it, saying
why (``heatmap_error``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from serve_harness import csv_rows, make_png, run_once, wait_for


def _blocked(reports: Path, name: str) -> Path:
    blocker = reports / "heatmaps" / f"{name}.png"  # where name's overlay goes, as a folder
    (blocker / "in-the-way").mkdir(parents=True)
    return blocker


def _files(reports: Path) -> list[str]:
    return sorted(row["file"] for row in csv_rows(reports))


def test_a_heatmap_in_the_way_is_retried_and_the_result_waits_for_it(folders, daemons) -> None:
    incoming, reports = folders
    blocker = _blocked(reports, "x.png")
    d = daemons(incoming, reports).start()
    make_png(incoming / "x.png", seed=1)
    make_png(incoming / "y.png", seed=2)
    wait_for(lambda: _files(reports) == ["y.png"], 60, "y.png reported")
    wait_for(lambda: "held back until its heatmap" in d.log_text(), 30, "x.png held")
    assert _files(reports) == ["y.png"]  # x.png: no row while its heatmap is missing
    shutil.rmtree(blocker)
    wait_for(lambda: _files(reports) == ["x.png", "y.png"], 90, "x.png reported after all")
    assert d.stop() == 0
    record = json.loads((reports / "json" / "x.png.json").read_text())
    assert record["heatmap"] == "heatmaps/x.png.png"
    assert (reports / "heatmaps" / "x.png.png").is_file()
    assert "heatmap_error" not in record
    events = [e["message"] for e in d.log_events() if "x.png" in e["message"]]
    assert sum("held back" in m for m in events) == 1  # once per state, not per try


def test_with_once_a_heatmap_still_in_the_way_is_given_up_knowingly(
    folders, tiny_onnx_model: Path
) -> None:
    incoming, reports = folders
    _blocked(reports, "x.png")
    make_png(incoming / "x.png", seed=1)
    make_png(incoming / "y.png", seed=2)
    result = run_once(incoming, reports, tiny_onnx_model)
    assert result.returncode == 0, result.stderr
    assert _files(reports) == ["x.png", "y.png"]
    record = json.loads((reports / "json" / "x.png.json").read_text())
    assert record["heatmap"] is None
    assert "heatmaps/x.png.png" in record["heatmap_error"]
    assert "recorded without its heatmap" in result.stderr
    other = json.loads((reports / "json" / "y.png.json").read_text())
    assert other["heatmap"] == "heatmaps/y.png.png"


def test_the_dicom_sr_waits_for_its_overlay(folders, daemons, real_dicoms: list[Path]) -> None:
    """With ``--dicom-sr``, a DICOM result is queued for its SR when it is recorded: held,
    no SR is written for it (while the other file's SR is); once its heatmap is written,
    its SR comes with the overlay's Secondary Capture."""
    incoming, reports = folders
    blocker = _blocked(reports, "a.dcm")
    d = daemons(incoming, reports, "--dicom-sr").start()

    def written(kind: str) -> int:
        return len(list((reports / "dicom").rglob(f"*.{kind}.dcm")))

    shutil.copyfile(real_dicoms[0], incoming / "a.dcm")
    shutil.copyfile(real_dicoms[1], incoming / "b.dcm")
    wait_for(lambda: _files(reports) == ["b.dcm"], 60, "b.dcm reported")
    wait_for(lambda: written("SR") == 1 and written("SC") == 1, 60, "b.dcm's SR and SC")
    wait_for(lambda: "held back until its heatmap" in d.log_text(), 30, "a.dcm held")
    assert written("SR") == 1  # none for a.dcm while its overlay is missing
    shutil.rmtree(blocker)
    wait_for(lambda: written("SR") == 2 and written("SC") == 2, 90, "a.dcm's SR with its SC")
    assert d.stop() == 0
    assert _files(reports) == ["a.dcm", "b.dcm"]


def test_a_heatmap_name_too_long_is_given_up_at_once_knowingly(folders, daemons) -> None:
    """A 252-byte input name: its heatmap's name (``<name>.png``) is over the file system's
    255 bytes, which no retry can change. The result is recorded at once, saying so."""
    from xrwatch.serve.reports import json_path

    incoming, reports = folders
    name = "a" * 248 + ".png"
    d = daemons(incoming, reports).start()
    make_png(incoming / name, seed=1)
    wait_for(lambda: _files(reports) == [name], 60, "its row")
    assert d.stop() == 0
    record = json.loads(json_path(reports, name).read_text())
    assert record["heatmap"] is None
    assert "longer than the file system allows" in record["heatmap_error"]
    assert "held back" not in d.log_text()
