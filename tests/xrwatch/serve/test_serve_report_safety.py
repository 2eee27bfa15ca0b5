"""Reports that no input can poison: bounded, collision-free JSON names; a row whose report
cannot be written is held and shown, never blocking the others; no spreadsheet formulas or
terminal escapes from names and DICOM values; one model per reports folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from serve_harness import ROOT, assert_csv_intact, csv_rows, make_png, run_once, wait_for

from tests.helpers.dicom_factory import gradient, write_dicom
from xrwatch.serve.reports import json_path


def _status(state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xrwatch", "status", "--state-dir", str(state), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_poisoned_report_paths_do_not_block_later_rows(
    tmp_path: Path, tiny_onnx_model: Path
) -> None:
    incoming = tmp_path / "in"
    reports = tmp_path / ("r" * 200) / ("r" * 200)  # a long reports path, as deployed ones are
    long_name = "a" * 247 + ".png"  # 251 bytes: a legal name whose ".json" is 256 bytes
    deep = "/".join(["d" * 250] * 15)  # ~3.8 KB: readable in INCOMING, too long under REPORTS
    looks_hashed = "h~" + "0" * 32  # what a long name's report is called, minus ".json"
    names = [long_name, "x", "x.json/y.png", f"{deep}/z.png", looks_hashed]
    names += [f"later{i}.png" for i in range(4)]
    for i, name in enumerate(names):
        if name in ("x", looks_hashed):
            (incoming / name).parent.mkdir(parents=True, exist_ok=True)
            (incoming / name).write_text("not an image")
        else:
            make_png(incoming / name, seed=i, size=16)
    r = run_once(incoming, reports, tiny_onnx_model)  # exits: no row can block the others
    assert r.returncode == 1, r.stderr  # 1: "x" is not an image
    rows = assert_csv_intact(reports)
    assert Counter(row["file"] for row in rows) == Counter(names)
    targets = {json_path(reports, n) for n in names}
    assert len(targets) == len(names)  # distinct reports for distinct inputs
    for name in names:
        target = json_path(reports, name)
        assert json.loads(target.read_bytes())["file"] == name
        assert len(os.fsencode(str(target))) < 4096
        assert all(len(os.fsencode(p)) <= 255 for p in target.parts)
    assert json_path(reports, "plain/b.png") == reports / "json" / "plain" / "b.png.json"


def test_a_report_that_cannot_be_written_is_held_and_shown(folders, tiny_onnx_model: Path) -> None:
    incoming, reports = folders
    make_png(incoming / "sub" / "a.png", seed=1)
    for i in range(3):
        make_png(incoming / f"b{i}.png", seed=10 + i)
    (reports / "json").mkdir(parents=True)
    (reports / "json" / "sub").write_text("a file where the report folder should be")
    r = run_once(incoming, reports, tiny_onnx_model)
    assert r.returncode == 1, r.stderr  # exits, and says not everything was reported
    assert sorted(row["file"] for row in csv_rows(reports)) == ["b0.png", "b1.png", "b2.png"]
    assert "sub/a.png: report not written" in r.stderr
    assert f"{reports / 'json' / 'sub'} is not a folder" in r.stderr  # what is in the way
    assert "File exists" not in r.stderr
    assert "1 result(s) are recorded in the ledger but not in" in r.stderr
    state = reports / ".xrwatch-state"
    data = json.loads(_status(state, "--json").stdout)
    assert data["unreported"] == {"total": 1, "held": 1}
    assert data["held_reports"][0]["file"] == "sub/a.png"
    assert "1 result(s), 1 held back" in _status(state).stdout
    # fixed: the next start writes it, once
    (reports / "json" / "sub").unlink()
    r = run_once(incoming, reports, tiny_onnx_model)
    assert r.returncode == 0, r.stderr
    rows = assert_csv_intact(reports)
    assert sorted(row["file"] for row in rows) == ["b0.png", "b1.png", "b2.png", "sub/a.png"]
    assert json.loads(_status(state, "--json").stdout)["unreported"] == {"total": 0, "held": 0}


def test_a_folder_in_place_of_one_report_holds_that_row_and_the_batch_is_written(
    folders, tiny_onnx_model: Path
) -> None:
    """The JSON files of a flush are renamed together (``replace_all``); one that cannot be
    renamed into place is held, naming its file, and leaves no temporary file behind."""
    incoming, reports = folders
    for i in range(5):
        make_png(incoming / f"p{i}.png", seed=20 + i)
    blocked = json_path(reports, "p2.png")
    (blocked / "inside").mkdir(parents=True)  # a non-empty folder: rename cannot replace it
    r = run_once(incoming, reports, tiny_onnx_model)
    assert r.returncode == 1, r.stderr
    assert sorted(row["file"] for row in csv_rows(reports)) == [
        "p0.png",
        "p1.png",
        "p3.png",
        "p4.png",
    ]
    assert f"p2.png: report not written ({blocked}: " in r.stderr
    assert [p.name for p in (reports / "json").iterdir() if p.name.startswith(".")] == []
    for name in ("p0.png", "p1.png", "p3.png", "p4.png"):
        assert json.loads(json_path(reports, name).read_bytes())["file"] == name


def test_csv_has_no_formulas_and_logs_and_status_no_terminal_escapes(
    folders, tiny_onnx_model: Path
) -> None:
    incoming, reports = folders
    names = ["=HYPERLINK(1).png", "+1.png", "-1.png", "@SUM(A1).png"]
    for i, name in enumerate(names):
        make_png(incoming / name, seed=i)
    write_dicom(incoming / "acc.dcm", pixels=gradient(32, 32), accession_number="=2+5")
    write_dicom(incoming / "ct.dcm", pixels=gradient(16, 16), modality="CT\x1b[2J")
    r = run_once(incoming, reports, tiny_onnx_model, "--log-format", "text")
    assert r.returncode == 1, r.stderr  # the CT is an error
    rows = {row["file"]: row for row in assert_csv_intact(reports)}
    assert sorted(rows) == sorted(["'" + n for n in names] + ["acc.dcm", "ct.dcm"])
    assert rows["acc.dcm"]["accession_number"] == "'=2+5"
    for name in names:  # the JSON keeps the exact values
        assert json.loads(json_path(reports, name).read_text())["file"] == name
    assert json.loads(json_path(reports, "acc.dcm").read_text())["accession_number"] == "=2+5"
    assert "\x1b" not in r.stderr and "CT\\x1b[2J" in r.stderr
    assert "\x1b" not in rows["ct.dcm"]["error"]
    out = _status(reports / ".xrwatch-state").stdout
    assert "CT\\x1b[2J" in out and "\x1b" not in out


def _other_model(model: Path, out: Path) -> Path:
    """The same network under another sha256 (a retrained model, for the reports' sake)."""
    import onnx

    proto = onnx.load(str(model))
    for prop in proto.metadata_props:
        if prop.key == "xrwatch.created_at":
            prop.value = "2001-01-01T00:00:00Z"
    onnx.save(proto, str(out))
    return out


def test_a_second_model_on_one_reports_folder_is_refused(
    folders, daemons, tiny_onnx_model: Path, tmp_path: Path
) -> None:
    incoming, reports = folders
    other = _other_model(tiny_onnx_model, tmp_path / "other.onnx")
    d = daemons(incoming, reports).start()
    make_png(incoming / "a.png", seed=1)
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "one row")
    r = run_once(incoming, reports, other, "--state-dir", str(tmp_path / "state2"))
    assert r.returncode == 2, r.stderr
    assert str(reports) in r.stderr and "other.onnx" in r.stderr, r.stderr
    assert str(tiny_onnx_model) in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_once(incoming, reports, tiny_onnx_model)  # the same model may share the folder
    assert r.returncode == 0, r.stderr
    assert d.stop() == 0
    r = run_once(incoming, reports, other, "--state-dir", str(tmp_path / "state2"))
    assert r.returncode == 0, r.stderr  # alone now: the folder is free for another model


def test_once_exits_when_no_report_can_be_written(folders, tiny_onnx_model: Path) -> None:
    incoming, reports = folders
    make_png(incoming / "a.png", seed=1)
    reports.mkdir()
    (reports / "predictions.csv").mkdir()  # nothing can be appended: every write fails
    r = run_once(incoming, reports, tiny_onnx_model)  # gives up after a few tries, exit 1
    assert r.returncode == 1, r.stderr
    assert "1 result(s) are recorded in the ledger but not in" in r.stderr, r.stderr
    (reports / "predictions.csv").rmdir()
    r = run_once(incoming, reports, tiny_onnx_model)  # the next start writes it
    assert r.returncode == 0, r.stderr
    assert [row["file"] for row in assert_csv_intact(reports)] == ["a.png"]
