"""ONNX Runtime stays quiet and leaves $HOME alone: ``--log-format json`` holds for a
service user whose home is missing or not writable (every stderr line parses as JSON)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "xrwatch" / "samples" / "Normal"


def _inbox(tmp_path: Path) -> tuple[Path, Path]:
    incoming, reports = tmp_path / "in", tmp_path / "reports"
    incoming.mkdir()
    for image in sorted(SAMPLES.glob("*.jpeg"))[:2]:
        shutil.copy(image, incoming / image.name)
    assert any(incoming.iterdir()), f"no sample images in {SAMPLES}"
    return incoming, reports


def _env(home: str) -> dict[str, str]:
    # Not inherited from this process: importing xrwatch here has set it already, and the
    # point is that the command sets it itself.
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=home, PYTHONPATH=str(ROOT), NO_COLOR="1")
    env.pop("XDG_CACHE_HOME", None)
    return env


def _serve(
    prefix: list[str], incoming: Path, reports: Path, home: str
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "xrwatch", "serve", str(incoming), "--reports", str(reports)]
    return subprocess.run(
        [*prefix, *command, "--once", "--log-format", "json"],
        cwd="/",
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _assert_json_lines(stderr: str) -> list[dict[str, object]]:
    records = []
    for line in stderr.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a stderr line is not JSON: {line!r}\n--- stderr:\n{stderr}")
    assert records, "the daemon logged nothing"
    return records


def test_import_writes_nothing_to_home_and_prints_nothing(tmp_path: Path) -> None:
    """The bare import with telemetry on (the default) writes into HOME; through xrwatch it
    does not. Checks that the switch is what makes the difference."""
    code = "import xrwatch, onnxruntime"
    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run(
        [sys.executable, "-c", code], env=_env(str(home)), cwd="/", capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""
    assert list(home.iterdir()) == []


def test_serve_json_logs_with_a_missing_home(tmp_path: Path) -> None:
    incoming, reports = _inbox(tmp_path)
    home = tmp_path / "no-such-home"
    r = _serve([], incoming, reports, str(home))
    assert r.returncode == 0, r.stderr
    records = _assert_json_lines(r.stderr)
    assert any("model" in str(rec.get("message")) for rec in records)
    assert not home.exists(), "something was written to HOME"
    assert (reports / "predictions.csv").is_file()


def test_serve_json_logs_with_an_unwritable_home(tmp_path: Path) -> None:
    incoming, reports = _inbox(tmp_path)
    if os.geteuid() == 0:
        home = "/proc/xrwatch-no-home"  # not even root can create it
    else:
        locked = tmp_path / "locked-home"
        locked.mkdir(mode=0o555)
        home = str(locked)
    r = _serve([], incoming, reports, home)
    assert r.returncode == 0, r.stderr
    _assert_json_lines(r.stderr)


def test_serve_json_logs_as_nobody(tmp_path: Path) -> None:
    """As root, the real case: the service user with no home, via ``runuser -u nobody``."""
    runuser = shutil.which("runuser")
    if os.geteuid() != 0 or runuser is None:
        pytest.skip("needs root and runuser")
    prefix = [runuser, "-u", "nobody", "--"]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import xrwatch"], env=_env("/nonexistent"),
        cwd="/", capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this interpreter/checkout: {probe.stderr.strip()}")
    tmp_path.chmod(0o777)
    incoming, reports = _inbox(tmp_path)
    for path in (incoming, *incoming.iterdir()):
        path.chmod(0o777 if path.is_dir() else 0o644)
    reports.mkdir(mode=0o777)
    reports.chmod(0o777)
    r = _serve(prefix, incoming, reports, "/nonexistent")
    assert r.returncode == 0, r.stderr
    _assert_json_lines(r.stderr)
