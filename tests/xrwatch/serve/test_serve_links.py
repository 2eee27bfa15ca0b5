"""A symbolic link to a file inside INCOMING is read like any file (its target's bytes)."""

from __future__ import annotations

from pathlib import Path

from serve_harness import assert_csv_intact, make_png, run_once


def test_link_inside_incoming_is_processed(folders, tiny_onnx_model: Path) -> None:
    incoming, reports = folders
    target = make_png(incoming / "scan.png", seed=7, size=64)
    (incoming / "link.png").symlink_to(target)
    result = run_once(incoming, reports, tiny_onnx_model)
    assert result.returncode == 0, result.stderr
    rows = {r["file"]: r for r in assert_csv_intact(reports)}
    assert sorted(rows) == ["link.png", "scan.png"]
    assert rows["link.png"]["status"] == "ok", rows["link.png"]
    assert rows["link.png"]["sha256"] == rows["scan.png"]["sha256"]
