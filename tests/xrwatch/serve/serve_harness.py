"""Harness for the daemon tests: real ``xrwatch serve`` processes on real folders.

Each :class:`DaemonProc` is a subprocess with its own sd_notify socket, so a test knows
exactly when the daemon is READY (model loaded, watch live) instead of sleeping.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]

# Short waits so tests stay fast; production defaults are 2 s / 60 s.
FAST = (
    "--stable-seconds", "0.3",
    "--rescan-interval", "2",
    "--max-wait", "0.1",
    "--batch-size", "8",
    "--workers", "2",
    "--log-format", "json",
    "--log-level", "DEBUG",
)  # fmt: skip


def wait_for(pred: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``pred`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def csv_rows(reports: Path) -> list[dict[str, str]]:
    """Rows of ``reports/predictions.csv`` (empty when it does not exist yet)."""
    path = reports / "predictions.csv"
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def assert_csv_intact(reports: Path) -> list[dict[str, str]]:
    """Every line complete (ends with a newline) with exactly the header's number of fields."""
    data = (reports / "predictions.csv").read_bytes()
    assert data.endswith(b"\n"), "last CSV line is torn (no newline)"
    lines = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    header = lines[0]
    assert header[:4] == ["processed_at", "file", "sha256", "status"]
    assert lines.count(header) == 1, "header written more than once"
    for n, line in enumerate(lines[1:], start=2):
        assert len(line) == len(header), f"line {n} has {len(line)} fields, not {len(header)}"
    return csv_rows(reports)


def make_png(path: Path, seed: int, size: int = 24) -> Path:
    """A small, unique grayscale PNG."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    return path


def png_bytes(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class DaemonProc:
    """An ``xrwatch serve`` subprocess on real folders."""

    def __init__(
        self,
        incoming: Path,
        reports: Path,
        model: Path,
        *extra: str,
        state_dir: Path | None = None,
        log: Path | None = None,
        fast: bool = True,
    ) -> None:
        self.incoming, self.reports, self.model = incoming, reports, model
        self.state_dir = state_dir or reports / "state"
        self.args = [
            sys.executable, "-m", "xrwatch", "serve", str(incoming),
            "--model", str(model), "--reports", str(reports), "--state-dir", str(self.state_dir),
            *(FAST if fast else ()), *extra,
        ]  # fmt: skip
        self.log = log or reports.parent / f"daemon-{id(self)}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._sockdir = tempfile.mkdtemp(prefix="xrw", dir="/tmp")
        self.sock_path = os.path.join(self._sockdir, "n")
        self.messages: list[str] = []
        self.stamped: list[tuple[float, str]] = []  # (time.monotonic() received, message)
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None

    def start(self, *, wait_ready: bool = True, env: dict[str, str] | None = None) -> DaemonProc:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self.sock_path)
        sock.settimeout(0.2)
        self._sock = sock
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._reader.start()
        env = dict(os.environ, **(env or {}), NOTIFY_SOCKET=self.sock_path, PYTHONUNBUFFERED="1")
        self._logfh = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, env=env, stdout=self._logfh, stderr=subprocess.STDOUT
        )
        if wait_ready:
            self.wait_ready()
        return self

    def _read_notify(self) -> None:
        assert self._sock is not None
        while self._sock is not None:
            try:
                data = self._sock.recv(65536)
            except (TimeoutError, OSError):
                if self.proc is not None and self.proc.poll() is not None:
                    time.sleep(0.05)
                continue
            self.stamped.append((time.monotonic(), data.decode()))
            self.messages.append(data.decode())

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode} before READY:\n{self.log_text()}"
                )
            return any("READY=1" in m for m in self.messages)

        wait_for(ready, timeout, "READY=1 from the daemon")

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """Every log line, each parsed as one JSON object (fails on a non-JSON line)."""
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._close()
        return rc

    def stop(self, timeout: float = 60.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()  # reap, so its pid no longer looks alive
        self._close()

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if self._reader is not None:
            self._reader.join()
            self._reader = None
        if sock is not None:
            sock.close()
        if os.path.exists(self.sock_path):
            os.unlink(self.sock_path)
        fh = getattr(self, "_logfh", None)
        if fh is not None and not fh.closed:
            fh.close()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()
        try:
            os.rmdir(self._sockdir)
        except OSError:
            pass


def run_once(
    incoming: Path, reports: Path, model: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``xrwatch serve --once`` to completion."""
    return subprocess.run(
        [
            sys.executable, "-m", "xrwatch", "serve", str(incoming), "--model", str(model),
            "--reports", str(reports), "--once", *FAST, *extra,
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# The fixtures both the serve and the DICOM tests use; each conftest imports them.
@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """``(incoming, reports)`` under tmp_path; incoming exists, reports is left to serve."""
    incoming, reports = tmp_path / "incoming", tmp_path / "reports"
    incoming.mkdir()
    return incoming, reports


@pytest.fixture
def daemons(tiny_onnx_model: Path) -> Iterator[Callable[..., DaemonProc]]:
    """Factory for :class:`DaemonProc` bound to the tiny model; kills leftovers at the end."""
    made: list[DaemonProc] = []

    def factory(incoming: Path, reports: Path, *extra: str, **kw: Any) -> DaemonProc:
        d = DaemonProc(incoming, reports, tiny_onnx_model, *extra, **kw)
        made.append(d)
        return d

    yield factory
    for d in made:
        d.cleanup()
