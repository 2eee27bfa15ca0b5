"""What bypasses Python's logging (ONNX Runtime's C++ logger on fd 2, ``warnings``) still
comes out in the configured format, one record per line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, warnings
    from xrwatch.logs import configure_logging, native_stderr_to_log, printed_to_log
    configure_logging("INFO", "json")
    warnings.warn("a Python warning")
    with printed_to_log():  # as onnxruntime.preload_dlls() prints its warnings
        print("\033[33mWARNING: Unable to parse CUDA version 'x'.\033[0m")
    with native_stderr_to_log():
        os.write(2, b"\\x1b[1;31m2026-01-01 00:00:00.1 [E:onnxruntime:Default, "
                    b"provider_bridge_ort.cc:2 TryGetProviderInfo_CUDA] cannot load\\x1b[m\\n")
        os.write(2, b"a line in no known format\\n")
    """
)


def test_native_stderr_and_python_warnings_become_json_records() -> None:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stderr.splitlines()]  # every line is JSON
    by_logger = {(rec["logger"], rec["level"]): rec["message"] for rec in records}
    assert "a Python warning" in by_logger[("py.warnings", "warning")]
    assert by_logger[("onnxruntime", "error")] == "cannot load"
    assert by_logger[("onnxruntime", "warning")] == "a line in no known format"
    assert "WARNING: Unable to parse CUDA version 'x'." in [
        rec["message"] for rec in records if rec["logger"] == "onnxruntime"
    ]
    assert "\x1b" not in r.stderr and r.stdout == ""
