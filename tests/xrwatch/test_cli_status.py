"""``xrwatch status`` as a monitor uses it: LSB exit codes (0 running, 1 dead with its state
left behind, 3 not running) for a running, a killed (kill -9), a cleanly stopped and a
never-started daemon; ``--json``, ``--config``, counts by flag."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xrwatch.cli._app import EXIT_ERROR, main

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "xrwatch" / "samples"
RUNNING, DEAD, NOT_RUNNING = 0, 1, 3


def _status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = main(["status", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """``xrwatch serve`` on an inbox of two real X-rays and a photo-like blank image."""
    incoming, reports = tmp_path / "in", tmp_path / "reports"
    incoming.mkdir()
    shutil.copy(SAMPLES / "Normal" / "IM-0178-0001.jpeg", incoming / "a.jpeg")
    shutil.copy(SAMPLES / "Virus" / "person15_virus_46.jpeg", incoming / "b.jpeg")
    from PIL import Image

    Image.new("L", (300, 300), 128).save(incoming / "blank.png")  # out_of_scope: constant
    proc = subprocess.Popen(
        [sys.executable, "-m", "xrwatch", "serve", str(incoming), "--reports", str(reports),
         "--no-heatmaps", "--stable-seconds", "0.2"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield proc, reports / ".xrwatch-state"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        if proc.stderr is not None:
            proc.stderr.close()


def _wait_for(capsys: pytest.CaptureFixture[str], state: Path, want: int, ok: int = 0) -> dict:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if (state / "ledger.sqlite3").is_file():
            code, data = _status(capsys, "--state-dir", str(state))
            if code == want and data.get("counts", {}).get("ok", 0) >= ok:
                return data
        time.sleep(0.3)
    pytest.fail(f"status never became {want} with {ok} ok result(s)")


def test_never_started_is_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = _status(capsys, "--state-dir", str(tmp_path / "nothing-here"))
    assert code == NOT_RUNNING and data["state"] == "not running" and data["exit_code"] == 3
    assert main(["status", "--state-dir", str(tmp_path)]) == NOT_RUNNING  # text, same code
    assert "never started" in capsys.readouterr().out


def test_running_then_killed(
    daemon: tuple[subprocess.Popen[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    proc, state = daemon
    data = _wait_for(capsys, state, RUNNING, ok=3)
    assert data["state"] == "running" and [d["state"] for d in data["daemons"]] == ["alive"]
    assert data["flags"]["out_of_scope"] >= 1  # the blank image
    assert sum(data["flags"].values()) == data["counts"]["ok"] == 3
    assert data["outbox"] is None  # no DICOM node here
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    code, data = _status(capsys, "--state-dir", str(state))
    assert code == DEAD and data["state"] == "dead"
    assert [d["state"] for d in data["daemons"]] == ["stopped"]
    assert main(["status", "--state-dir", str(state)]) == DEAD
    text = capsys.readouterr().out
    assert "out_of_scope" in text and "status: dead (exit 1)" in text


def test_stopped_cleanly_is_3(
    daemon: tuple[subprocess.Popen[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    proc, state = daemon
    _wait_for(capsys, state, RUNNING)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    code, data = _status(capsys, "--state-dir", str(state))
    assert code == NOT_RUNNING and data["daemons"] == []
    assert data["counts"]["ok"] + data["counts"]["error"] >= 0  # the ledger is still read


def test_a_hung_daemon_is_dead_with_state_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No heartbeat for over 30 s from a process that exists (this one): stale, exit 1."""
    from xrwatch.serve.ledger import Ledger

    Ledger(tmp_path).close()  # an empty ledger
    con = sqlite3.connect(tmp_path / "ledger.sqlite3")
    with con:
        con.execute(
            "INSERT INTO daemons (owner, host, pid, started_at, heartbeat_at, incoming) "
            "VALUES ('x', ?, ?, ?, ?, '/in')",
            (socket.gethostname(), os.getpid(), time.time() - 300, time.time() - 100),
        )
    con.close()
    code, data = _status(capsys, "--state-dir", str(tmp_path))
    assert code == DEAD and [d["state"] for d in data["daemons"]] == ["stale"]


def test_config_names_the_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xrwatch.serve.ledger import Ledger

    (tmp_path / "r" / ".xrwatch-state").mkdir(parents=True)
    Ledger(tmp_path / "r" / ".xrwatch-state").close()
    cfg = tmp_path / "xrwatch.toml"
    cfg.write_text('[serve]\nincoming = "in"\nreports = "r"\n', encoding="utf-8")
    code, data = _status(capsys, "--config", str(cfg))
    assert code == NOT_RUNNING and data["state_dir"] == str(tmp_path / "r" / ".xrwatch-state")
    assert data["counts"] == {"ok": 0, "error": 0, "claimed": 0}
    cfg.write_text('[serve]\nreports = "r"\nstate_dir = "/nowhere/state"\n', encoding="utf-8")
    assert _status(capsys, "--config", str(cfg))[1]["state_dir"] == "/nowhere/state"


def test_neither_state_dir_nor_config_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["status"]) == EXIT_ERROR
    assert "--state-dir" in capsys.readouterr().err
