"""``--once`` exit codes, configuration, start-up errors, archive, status, metrics and
/healthz, sd_notify, the torch-free import, and a clean in-process lifecycle."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_harness import ROOT, assert_csv_intact, csv_rows, make_png, run_once, wait_for

from tests.helpers.net import free_port
from xrwatch.errors import ConfigError
from xrwatch.serve.config import ServeConfig, field_names, load_serve_config
from xrwatch.serve.daemon import Daemon


def test_once_exit_0_when_every_file_is_ok(folders, tiny_onnx_model: Path) -> None:
    incoming, reports = folders
    for i in range(3):
        make_png(incoming / f"{i}.png", seed=i)
    result = run_once(incoming, reports, tiny_onnx_model)
    assert result.returncode == 0, result.stderr
    assert len(assert_csv_intact(reports)) == 3
    # a second run finds nothing new, writes nothing, still exit 0
    result = run_once(incoming, reports, tiny_onnx_model)
    assert result.returncode == 0, result.stderr
    assert len(csv_rows(reports)) == 3


def test_once_exit_1_when_some_file_failed(folders, tiny_onnx_model: Path) -> None:
    incoming, reports = folders
    make_png(incoming / "ok.png", seed=1)
    (incoming / "bad.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 50)  # JPEG that does not decode
    result = run_once(incoming, reports, tiny_onnx_model)
    assert result.returncode == 1, result.stderr
    rows = {r["file"]: r for r in csv_rows(reports)}
    assert rows["ok.png"]["status"] == "ok" and rows["bad.jpg"]["status"] == "error"


def test_start_up_errors_exit_2_with_a_clear_message(
    folders, tiny_onnx_model: Path, tmp_path: Path
) -> None:
    incoming, reports = folders
    # model missing
    r = run_once(incoming, reports, tmp_path / "missing.onnx")
    assert r.returncode == 2 and "model file not found" in r.stderr, r.stderr
    # model that is not an ONNX file
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    r = run_once(incoming, reports, junk)
    assert r.returncode == 2 and "junk.onnx" in r.stderr, r.stderr
    # reports folder cannot be created (a file is in the way)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    r = run_once(incoming, blocker / "reports", tiny_onnx_model)
    assert r.returncode == 2 and "not writable" in r.stderr, r.stderr
    # INCOMING missing
    r = run_once(tmp_path / "nope", reports, tiny_onnx_model)
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
    # reports inside INCOMING would be watched by the daemon itself
    r = run_once(incoming, incoming / "reports", tiny_onnx_model)
    assert r.returncode == 2 and "must be outside INCOMING" in r.stderr, r.stderr


def test_config_file_with_cli_override_and_unknown_keys(
    folders, tiny_onnx_model: Path, tmp_path: Path
) -> None:
    incoming, reports = folders
    cfg = tmp_path / "xrwatch.toml"
    cfg.write_text(
        f'[serve]\nincoming = "{incoming}"\nmodel = "{tiny_onnx_model}"\n'
        f'reports = "{reports}"\nbatch_size = 3\nstable_seconds = 5.0\nonce = true\n'
    )
    config = load_serve_config(cfg, {"stable_seconds": 0.5, "poll": None})
    assert config.batch_size == 3 and config.stable_seconds == 0.5 and config.once
    assert config.state_path == reports / ".xrwatch-state"
    make_png(incoming / "a.png", seed=1)
    r = subprocess.run(
        [sys.executable, "-m", "xrwatch", "serve", "--config", str(cfg), "--stable-seconds", "0.2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(csv_rows(reports)) == 1
    cfg.write_text(cfg.read_text() + "batch_sise = 4\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_serve_config(cfg, {})
    r = subprocess.run(
        [sys.executable, "-m", "xrwatch", "serve", "--config", str(cfg)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "batch_sise" in r.stderr
    with pytest.raises(ConfigError, match="batch_size"):
        ServeConfig(incoming, tiny_onnx_model, reports, batch_size=0)


def test_archive_moves_inputs_keeping_paths_without_collisions(
    folders, tiny_onnx_model: Path, tmp_path: Path
) -> None:
    incoming, reports = folders
    archive = tmp_path / "archive"
    make_png(incoming / "study" / "a.png", seed=1)
    (incoming / "study" / "bad.png").write_text("not an image")
    r = run_once(incoming, reports, tiny_onnx_model, "--archive", str(archive))
    assert r.returncode == 1, r.stderr
    assert (archive / "processed" / "study" / "a.png").is_file()
    assert (archive / "failed" / "study" / "bad.png").is_file()
    assert not (incoming / "study" / "a.png").exists()
    # the same name again, new content: archived beside the first, not over it
    make_png(incoming / "study" / "a.png", seed=2)
    r = run_once(incoming, reports, tiny_onnx_model, "--archive", str(archive))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (archive / "processed" / "study").iterdir()) == [
        "a.1.png",
        "a.png",
    ]
    assert len(csv_rows(reports)) == 3


def test_status_reports_counts_and_last_errors(folders, tiny_onnx_model: Path) -> None:
    incoming, reports = folders
    make_png(incoming / "a.png", seed=1)
    (incoming / "b.png").write_text("text")
    done = run_once(incoming, reports, tiny_onnx_model)
    assert "stopped: 1 ok, 1 error since start" in done.stderr  # not "1 errors"
    state = reports / ".xrwatch-state"
    r = subprocess.run(
        [sys.executable, "-m", "xrwatch", "status", "--state-dir", str(state), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr  # LSB: not running (--once ended cleanly)
    data = json.loads(r.stdout)
    assert data["counts"] == {"ok": 1, "error": 1, "claimed": 0}
    assert data["throughput_per_minute"]["last_minute"] == 2
    assert data["last_errors"][0]["file"] == "b.png"
    assert "not a DICOM, PNG or JPEG" in data["last_errors"][0]["error"]
    r = subprocess.run(
        [sys.executable, "-m", "xrwatch", "status", "--state-dir", str(state)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "1 ok, 1 error" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "xrwatch", "status", "--state-dir", str(incoming)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 3 and "no ledger" in r.stdout  # LSB: not running, never started


def test_metrics_healthz_and_sd_notify(folders, daemons) -> None:
    incoming, reports = folders
    port = free_port()
    d = daemons(incoming, reports, "--metrics-port", str(port))
    d.start(env={"WATCHDOG_USEC": "400000"})  # as systemd sets it for WatchdogSec=0.4
    make_png(incoming / "a.png", seed=1)
    (incoming / "b.png").write_text("text")
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "two rows")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
        assert resp.status == 200 and resp.read().strip() == b"ok"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'xrwatch_files_total{outcome="ok"} 1.0' in text
    assert 'xrwatch_files_total{outcome="error"} 1.0' in text
    assert "xrwatch_latency_seconds_count 2.0" in text
    assert "xrwatch_queue_depth" in text
    assert 'provider="CPUExecutionProvider"' in text
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
    wait_for(lambda: any(m.startswith("STATUS=") and "1 ok" in m for m in d.messages), 30,
             "a STATUS= line with counts")  # fmt: skip
    wait_for(lambda: sum(m == "WATCHDOG=1" for m in d.messages) >= 3, 30, "watchdog pings")
    assert d.stop() == 0
    assert d.messages[0].startswith("READY=1")


def test_serving_path_never_imports_torch() -> None:
    code = (
        "import sys; import xrwatch.serve.daemon, xrwatch.cli.serve_cmd, xrwatch.engine; "
        "from xrwatch.cli import commands; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('clean')"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr


@pytest.fixture
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked:
            return
        time.sleep(0.05)
    raise AssertionError(f"leaked threads: {leaked}")


def test_in_process_daemon_stops_cleanly(
    no_leaked_threads: None, folders, tiny_onnx_model: Path, tmp_path: Path
) -> None:
    incoming, reports = folders
    for i in range(4):
        make_png(incoming / f"{i}.png", seed=i)
    config = ServeConfig(
        incoming, tiny_onnx_model, reports, stable_seconds=0.2, max_wait=0.05,
        metrics_port=0, rescan_interval=0.5,
    )  # fmt: skip
    daemon = Daemon(config)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(daemon.run()))
    runner.start()
    wait_for(lambda: len(csv_rows(reports)) == 4, 60, "four rows")
    make_png(incoming / "live.png", seed=50)
    wait_for(lambda: len(csv_rows(reports)) == 5, 60, "the live file")
    daemon.request_stop()
    runner.join(30)
    assert result == [0]
    assert (reports / ".xrwatch-state" / "ledger.sqlite3").is_file()


def test_deploy_example_config_is_valid() -> None:
    config = load_serve_config(ROOT / "deploy" / "xrwatch.toml", {})
    assert config.incoming == Path("/srv/xrwatch/incoming")
    assert config.state_path == Path("/var/lib/xrwatch")
    defaults = ServeConfig(Path("i"), Path("m"), Path("r"))
    for name in ("stable_seconds", "rescan_interval", "batch_size", "max_wait", "workers"):
        assert getattr(config, name) == getattr(defaults, name), name
    # the example names every key (commented where the default is not the deployment's)
    text = (ROOT / "deploy" / "xrwatch.toml").read_text()
    named = set(re.findall(r"^#? *(\w+) *=", text, flags=re.MULTILINE))
    assert set(field_names()) - named == set()
    unit = (ROOT / "deploy" / "xrwatch.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "User=xrwatch",
    ):
        assert line in unit, line  # fmt: skip
