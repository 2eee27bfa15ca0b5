"""Health that tells the truth and a daemon that signals and load cannot stop: /healthz and
metrics when reports or the ledger fail, watchdog pings under load, STOPPING=1 at once,
SIGHUP, a metrics port in use, idle metrics connections, and ``status`` alive/stale/stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serve_harness import ROOT, csv_rows, make_png, run_once, wait_for

from tests.helpers.net import free_port
from xrwatch.serve import metrics as metrics_module
from xrwatch.serve.config import ServeConfig
from xrwatch.serve.daemon import Daemon, load_engine


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(port: int, name: str) -> float:
    for line in _get(port, "/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _status(state: Path) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "xrwatch", "status", "--state-dir", str(state), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode in (0, 1, 3), r.stderr  # LSB: running, dead with state left, not running
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_healthz_503_while_results_cannot_be_written_and_held_rows_show(folders, daemons) -> None:
    incoming, reports = folders
    port = free_port()
    d = daemons(incoming, reports, "--metrics-port", str(port)).start()
    make_png(incoming / "a.png", seed=1)
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "one row")
    assert _get(port, "/healthz") == (200, "ok\n")
    # the CSV cannot be appended to: nothing can be reported
    csv_path = reports / "predictions.csv"
    os.replace(csv_path, reports / "saved.csv")
    csv_path.mkdir()
    make_png(incoming / "b.png", seed=2)
    wait_for(lambda: _get(port, "/healthz")[0] == 503, 60, "/healthz 503")
    code, text = _get(port, "/healthz")
    assert "results cannot be written" in text and "1 result(s) held back" in text, text
    assert _metric(port, "xrwatch_results_unreported") == 1.0
    assert _metric(port, "xrwatch_report_write_failures_total") >= 1.0
    # fixed: the held result is written and health recovers
    csv_path.rmdir()
    os.replace(reports / "saved.csv", csv_path)
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "the held row")
    wait_for(lambda: _get(port, "/healthz")[0] == 200, 60, "/healthz 200 again")
    assert _metric(port, "xrwatch_results_unreported") == 0.0
    # one row whose report cannot be written: held and shown, the others go on, still 200
    (reports / "json" / "sub").write_text("a file where a report folder should be")
    make_png(incoming / "sub" / "c.png", seed=3)
    make_png(incoming / "d.png", seed=4)
    wait_for(lambda: len(csv_rows(reports)) == 3, 60, "d.png")
    wait_for(lambda: _metric(port, "xrwatch_results_unreported") == 1.0, 30, "held gauge")
    code, text = _get(port, "/healthz")
    assert code == 200 and "1 result(s) held back" in text, text
    assert _status(reports / "state")["held_reports"][0]["file"] == "sub/c.png"
    assert d.stop() == 0


def test_healthz_503_when_the_ledger_cannot_be_written(folders, tiny_onnx_model: Path) -> None:
    incoming, reports = folders
    config = ServeConfig(incoming, tiny_onnx_model, reports, stable_seconds=0.2, max_wait=0.05)
    daemon = Daemon(config)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert daemon.ready.wait(60)
        wait_for(lambda: daemon.health()[0], 30, "healthy")

        def broken() -> None:
            raise sqlite3.OperationalError("disk I/O error")

        daemon.ledger.heartbeat = broken  # type: ignore[method-assign]
        _, text = wait_for(lambda: (h := daemon.health()) and not h[0] and h, 30, "unhealthy")
        assert "ledger" in text and "disk I/O error" in text, text
    finally:
        daemon.request_stop()
        runner.join(60)


def test_watchdog_pings_stay_on_time_under_a_full_backlog(folders, daemons) -> None:
    incoming, reports = folders
    n = 1000  # a backlog of several seconds here (about 1.6 s per 400 files on 2 cores)
    for i in range(n):
        make_png(incoming / f"b{i // 100}" / f"{i:04d}.png", seed=i, size=16)
    # WatchdogSec=2s: systemd kills a daemon whose pings are more than 2 s apart
    d = daemons(incoming, reports, "--batch-size", "4", "--workers", "1")
    d.start(env={"WATCHDOG_USEC": "2000000"})
    wait_for(lambda: len(csv_rows(reports)) >= n, 240, f"{n} rows")
    done = time.monotonic()  # the backlog is over (the stamps use the same clock)
    ready = next(t for t, m in d.stamped if m.startswith("READY=1"))
    pings = [t for t, m in d.stamped if m == "WATCHDOG=1" and ready <= t <= done]
    gaps = np.diff([ready, *pings, done])  # from READY to the last row, however fast it went
    assert d.stop() == 0
    assert pings and gaps.max() < 2.0, f"largest gap {gaps.max():.2f} s"


def test_stopping_is_sent_when_shutdown_starts(
    folders, tiny_onnx_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming, reports = folders
    sock_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    events: list[str] = []
    release, stopping, done = threading.Event(), threading.Event(), threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                msg = sock.recv(4096).decode()
            except OSError:
                continue
            for line in msg.splitlines():
                if line == "STOPPING=1":
                    events.append(line)
                    stopping.set()
                elif line.startswith("STATUS=stopped"):
                    events.append("STATUS=stopped")

    calls: list[int] = []

    def engine_factory(config: ServeConfig) -> Any:
        engine = load_engine(config)
        real = engine.predict_outputs  # the daemon's inference call

        def predict(batch: np.ndarray) -> Any:
            calls.append(len(batch))
            if len(calls) == 1:
                release.wait(60)  # the first batch holds until the test has asked for the stop
            else:
                stopping.wait(5)  # a drain batch: systemd should already know we are stopping
            events.append("predict")
            return real(batch)

        engine.predict_outputs = predict
        return engine

    for i in range(12):
        make_png(incoming / f"{i}.png", seed=i)
    config = ServeConfig(
        incoming, tiny_onnx_model, reports, stable_seconds=0.2, max_wait=0.05, batch_size=4
    )
    daemon = Daemon(config, engine_factory=engine_factory)
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert daemon.ready.wait(60)
        wait_for(lambda: calls, 30, "the first batch")
        # while the first batch is held, the workers decode the next files: the drain's work
        wait_for(lambda: any(f.done() for f in list(daemon._inflight)), 30, "a decoded file")
        daemon.request_stop()
    finally:
        release.set()
        runner.join(60)
        done.set()
        listener.join(10)
        sock.close()
    # batch 1 (in flight at the stop), STOPPING=1, then the drain's batches, then stopped
    assert events[:3] == ["predict", "STOPPING=1", "predict"], events
    assert events[-1] == "STATUS=stopped", events


def test_sighup_is_logged_and_ignored(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports).start()
    d.signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP" in d.log_text(), 30, "the SIGHUP log line")
    make_png(incoming / "after.png", seed=1)
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "a file processed after SIGHUP")
    assert d.proc is not None and d.proc.poll() is None
    assert d.stop() == 0


def test_metrics_port_in_use_is_a_clear_start_up_error(folders, tiny_onnx_model: Path) -> None:
    incoming, reports = folders
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_once(incoming, reports, tiny_onnx_model, "--metrics-port", str(port))
    assert r.returncode == 2, r.stderr
    assert f"--metrics-port {port}" in r.stderr and "in use" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_idle_metrics_connections_are_closed_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "IDLE_TIMEOUT", 0.5, raising=False)
    bound = getattr(metrics_module, "MAX_CONNECTIONS", 16)
    server = metrics_module.MetricsServer(
        metrics_module.Metrics(), "127.0.0.1", 0, lambda: (True, "ok")
    )
    server.start()
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    try:
        time.sleep(0.2)
        assert threading.active_count() - before <= bound
        for conn in idle:  # each is closed by the server: refused at once, or once idle
            conn.settimeout(30)
            assert conn.recv(100) == b""
        # every idle connection was closed by the server, so a scrape works again
        wait_for(lambda: threading.active_count() <= before, 30, "idle threads gone")
        assert _get(server.port, "/healthz") == (200, "ok\n")
    finally:
        for conn in idle:
            conn.close()
        server.stop()


def test_status_says_alive_then_stopped_after_kill_9(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports).start()
    data = _status(reports / "state")
    assert [x["state"] for x in data["daemons"]] == ["alive"]
    d.kill9()
    data = _status(reports / "state")
    assert [x["state"] for x in data["daemons"]] == ["stopped"]
    r = subprocess.run(
        [sys.executable, "-m", "xrwatch", "status", "--state-dir", str(reports / "state")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    text = " ".join(r.stdout.split())
    assert "stopped: the process is gone" in text and ": alive" not in text, r.stdout
    from xrwatch.cli.serve_cmd import daemon_state

    me = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat_at": time.time() - 300}
    assert daemon_state(me, time.time(), socket.gethostname()) == "stale"
    assert daemon_state({**me, "heartbeat_at": time.time()}, time.time(), "elsewhere") == "alive"
