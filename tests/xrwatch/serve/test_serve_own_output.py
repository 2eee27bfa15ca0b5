"""Never feed on its own output, folder side (issue #23): an SR and a heatmap Secondary
Capture that ``xrwatch serve --dicom-sr`` wrote, dropped into INCOMING (a PACS routing the
study back to a folder export, a user copying REPORTS), are skipped with a log line and a
counter: not classified, no SR/SC made for them, no error row; archived with ``--archive``."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

from serve_harness import assert_csv_intact, csv_rows, run_once, wait_for

from tests.helpers.dicom_factory import gradient, write_dicom
from tests.helpers.net import free_port


def _results(reports: Path) -> tuple[list[Path], list[Path]]:
    """The SRs and SCs under ``reports/dicom``."""
    found = sorted((reports / "dicom").rglob("*.dcm")) if (reports / "dicom").is_dir() else []
    return [p for p in found if p.name.endswith(".SR.dcm")], [
        p for p in found if p.name.endswith(".SC.dcm")
    ]


def _own_output(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    """An SR and an SC made by a real ``serve --once --dicom-sr`` on a first folder."""
    first, reports = tmp_path / "first", tmp_path / "first-reports"
    first.mkdir()
    write_dicom(first / "a.dcm", pixels=gradient(64, 64))
    r = run_once(first, reports, model, "--dicom-sr")
    assert r.returncode == 0, r.stderr
    (sr,), (sc,) = _results(reports)
    return sr, sc


def test_own_sr_and_sc_in_incoming_are_skipped_and_archived(
    folders: tuple[Path, Path], tiny_onnx_model: Path, tmp_path: Path
) -> None:
    incoming, reports = folders
    sr, sc = _own_output(tmp_path, tiny_onnx_model)
    write_dicom(incoming / "b.dcm", pixels=gradient(48, 40))  # a DICOM from elsewhere
    (incoming / "routed").mkdir()
    shutil.copy(sr, incoming / "routed" / "result.SR.dcm")
    shutil.copy(sc, incoming / "routed" / "heatmap.SC.dcm")
    archive = tmp_path / "archive"
    r = run_once(incoming, reports, tiny_onnx_model, "--dicom-sr", "--archive", str(archive))
    assert r.returncode == 0, r.stderr
    rows = assert_csv_intact(reports)
    assert [(row["file"], row["status"]) for row in rows] == [("b.dcm", "ok")]  # no error row
    srs, scs = _results(reports)
    assert len(srs) == 1 and len(scs) == 1  # only b.dcm's results, none for our own
    for name in ("routed/result.SR.dcm", "routed/heatmap.SC.dcm"):
        assert f"{name}: skipped: made by xrwatch" in r.stderr, r.stderr
        assert (archive / "processed" / name).is_file()  # handled: out of INCOMING
    assert (archive / "processed" / "b.dcm").is_file()
    assert not [p for p in incoming.rglob("*") if p.is_file()]
    # a second pass finds nothing to do
    r = run_once(incoming, reports, tiny_onnx_model, "--dicom-sr", "--archive", str(archive))
    assert r.returncode == 0 and len(csv_rows(reports)) == 1, r.stderr


def test_daemon_counts_its_own_output_once_and_leaves_it_without_archive(
    folders: tuple[Path, Path], daemons, tiny_onnx_model: Path, tmp_path: Path
) -> None:
    incoming, reports = folders
    sr, sc = _own_output(tmp_path, tiny_onnx_model)
    port = free_port()
    d = daemons(incoming, reports, "--metrics-port", str(port)).start()
    shutil.copy(sr, incoming / "result.SR.dcm")
    shutil.copy(sc, incoming / "heatmap.SC.dcm")
    write_dicom(incoming / "b.dcm", pixels=gradient(48, 40))
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "the row of b.dcm")

    def metrics() -> str:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read().decode()

    wait_for(lambda: "xrwatch_own_output_skipped_total 2.0" in metrics(), 60, "two skipped")
    write_dicom(incoming / "c.dcm", pixels=gradient(40, 48))  # rescans pass meanwhile
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "the row of c.dcm")
    assert "xrwatch_own_output_skipped_total 2.0" in metrics()  # not read again unchanged
    assert d.stop() == 0
    assert sorted(r["file"] for r in csv_rows(reports)) == ["b.dcm", "c.dcm"]
    assert (incoming / "result.SR.dcm").is_file() and (incoming / "heatmap.SC.dcm").is_file()
    log = d.log_text()
    for name in ("result.SR.dcm", "heatmap.SC.dcm"):
        assert log.count(f"{name}: skipped: made by xrwatch") == 1, log
