"""``--log-format json`` means every stderr line is JSON: start-up errors, ONNX Runtime's own
log lines, everything; and under systemd each line carries its syslog priority."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import numpy_helper
from serve_harness import FAST, ROOT, make_png

from xrwatch.logs import syslog_priority

WAITS = FAST[: FAST.index("--log-format")]  # the harness's short waits, without its log options
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def _serve(*args: str, journal: Path | None = None, config: Path | None = None) -> tuple[int, str]:
    """``python -m xrwatch serve ARGS``; with ``journal``, stderr is that file and
    JOURNAL_STREAM names it, as systemd does for a unit whose stderr is the journal."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    cmd = [sys.executable, "-m", "xrwatch", "serve", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    if journal is None:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
        return r.returncode, r.stderr
    with journal.open("w") as err:
        st = os.fstat(err.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        r = subprocess.run(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, timeout=120, env=env
        )  # fmt: skip
    return r.returncode, journal.read_text()


def _records(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line as JSON (fails on any line that is not)."""
    records = []
    for line in stderr.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"stderr line is not JSON: {line!r}\n--- stderr:\n{stderr}")
    assert records, "nothing on stderr"
    return records


def test_start_up_errors_are_json(folders, tmp_path: Path) -> None:
    incoming, reports = folders
    missing = tmp_path / "missing.onnx"
    base = [str(incoming), "--reports", str(reports), "--once", *WAITS]
    # the format from the command line, as the unit's ExecStart= gives it
    code, err = _serve(*base, "--model", str(missing), "--log-format", "json")
    assert code == 2
    (record,) = _records(err)
    assert record["level"] == "error" and record["error_type"] == "ModelError"
    assert record["message"] == f"{missing}: model file not found"
    # the format from the config file
    cfg = tmp_path / "xrwatch.toml"
    cfg.write_text('[serve]\nlog_format = "json"\n')
    code, err = _serve(*base, "--model", str(missing), config=cfg)
    assert code == 2 and _records(err)[-1]["message"] == f"{missing}: model file not found"
    # a usage error, found before logging could be set up
    code, err = _serve(*base, "--log-format", "json", "--no-such-option")
    assert code == 2 and "No such option" in _records(err)[-1]["message"]


def _with_unused_initializer(model: Path, dest: Path) -> Path:
    """The model plus an initializer no node uses: ONNX Runtime's C++ logger warns about it
    on stderr, in ANSI colours, when a session is created."""
    proto = onnx.load(str(model))
    proto.graph.initializer.append(numpy_helper.from_array(__import__("numpy").zeros(3), "unused"))
    onnx.save(proto, str(dest))
    return dest


def test_a_serve_run_logs_only_json_including_onnx_runtime(
    folders, tiny_onnx_model: Path, tmp_path: Path
) -> None:
    incoming, reports = folders
    model = _with_unused_initializer(tiny_onnx_model, tmp_path / "model.onnx")
    make_png(incoming / "a.png", seed=1)
    (incoming / "bad.png").write_text("not an image")
    code, err = _serve(
        str(incoming), "--model", str(model), "--reports", str(reports), "--once", *WAITS,
        "--log-format", "json", "--log-level", "INFO",
    )  # fmt: skip
    assert code == 1, err
    assert "\x1b[" not in err
    records = _records(err)
    ort = [r for r in records if r["logger"] == "onnxruntime"]
    assert ort and ort[0]["level"] == "warning", records
    assert "Removing initializer 'unused'" in ort[0]["message"]


def test_journald_gets_priority_prefixes(folders, tiny_onnx_model: Path, tmp_path: Path) -> None:
    incoming, reports = folders
    make_png(incoming / "a.png", seed=1)
    (incoming / "bad.png").write_text("not an image")
    base = [str(incoming), "--reports", str(reports), "--once", *WAITS]
    journal = tmp_path / "journal"
    code, err = _serve(
        *base, "--model", str(tiny_onnx_model), "--log-format", "json", "--log-level", "INFO",
        journal=journal,
    )  # fmt: skip
    assert code == 1, err
    seen = set()
    for line in err.splitlines():
        m = re.fullmatch(r"<([0-7])>(\{.*\})", line)
        assert m, f"no priority prefix: {line!r}"
        record = json.loads(m.group(2))
        assert int(m.group(1)) == syslog_priority(LEVELS[record["level"]]), line
        seen.add(int(m.group(1)))
    assert {4, 6} <= seen, err  # the bad file's warning, and info
    # a start-up error: priority 3, so that `journalctl -p err` shows it; JSON and text
    missing = str(tmp_path / "missing.onnx")
    code, err = _serve(*base, "--model", missing, "--log-format", "json", journal=journal)
    assert code == 2 and err.startswith("<3>{") and "model file not found" in err, err
    code, err = _serve(*base, "--model", missing, journal=journal)
    assert code == 2 and err.startswith("<3>error: ") and "model file not found" in err, err
    # outside the journal (JOURNAL_STREAM names another file): no prefixes
    code, err = _serve(*base, "--model", missing, "--log-format", "json")
    assert code == 2 and err.startswith("{"), err
