"""Stress the folder daemon: kill -9 mid-burst, then a backlog, through real ``xrwatch serve``.

    .venv/bin/python benchmarks/serve_stress.py [--files 300 --kills 3] [--backlog 1500]
        [--watchdog-sec 2] [--model M.onnx | --size 32]

systemd is emulated: each daemon gets ``NOTIFY_SOCKET`` (a unix datagram socket bound here)
and ``WATCHDOG_USEC``, and every ``WATCHDOG=1`` is timed on arrival.

1. Kill -9 mid-burst: ``--files`` small PNGs are dropped in while a daemon works; it is
   killed with SIGKILL ``--kills`` times at evenly spaced numbers of report rows and
   restarted each time; then the last one is stopped with SIGTERM.
2. Backlog: ``--backlog`` files are already in INCOMING when a fresh daemon starts.

Printed: report rows per file (must be exactly 1 for every file: min and max), files
missing, the largest gap between ``WATCHDOG=1`` pings after READY against ``WatchdogSec``,
and the largest gap between ledger heartbeats (polled from the ledger) against the
daemon's heartbeat period. Exit 0 when every file has exactly one row and no watchdog gap
reached ``WatchdogSec``. Defaults are modest (a minute or two on 2 cores); raise the flags
to stress harder.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xrwatch.sysinfo import describe as describe_machine  # noqa: E402


def png(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def drop(incoming: Path, name: str, seed: int) -> None:
    """Write under a hidden name, then rename in (as a careful writer does)."""
    path = incoming / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(png(seed))
    os.rename(tmp, path)


def rows_per_file(reports: Path) -> Counter[str]:
    path = reports / "predictions.csv"
    if not path.exists():
        return Counter()
    with path.open(encoding="utf-8", newline="") as fh:
        return Counter(row["file"] for row in csv.DictReader(fh))


class Daemon:
    """``xrwatch serve`` under an emulated systemd: notify socket and watchdog."""

    def __init__(self, incoming: Path, reports: Path, model: Path, args: list[str],
                 watchdog_sec: float) -> None:  # fmt: skip
        self.sockdir = tempfile.mkdtemp(prefix="xrws", dir="/tmp")
        self.sock_path = os.path.join(self.sockdir, "n")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.sock.settimeout(0.2)
        self.stamped: list[tuple[float, str]] = []
        self.log = open(reports.parent / "daemon.log", "ab")  # noqa: SIM115
        env = dict(
            os.environ,
            NOTIFY_SOCKET=self.sock_path,
            WATCHDOG_USEC=str(int(watchdog_sec * 1e6)),
        )
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "xrwatch", "serve", str(incoming), "--model", str(model),
                "--reports", str(reports), "--log-level", "WARNING", *args,
            ],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.state = reports / ".xrwatch-state" / "ledger.sqlite3"
        self.beats: list[float] = []
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._poller = threading.Thread(target=self._poll_heartbeat, daemon=True)
        deadline = time.monotonic() + 300
        while not any(m.startswith("READY=1") for _, m in self.stamped):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not become ready (see {self.log.name})")
            time.sleep(0.02)
        self._poller.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(65536)
            except OSError:
                continue
            self.stamped.append((time.monotonic(), data.decode()))

    def _poll_heartbeat(self) -> None:
        """Every 0.1 s, the ledger's heartbeat_at for this daemon; keep each new value."""
        last = None
        while not self._done.is_set():
            try:
                con = sqlite3.connect(f"file:{self.state}?mode=ro", uri=True, timeout=5)
                try:
                    row = con.execute(
                        "SELECT heartbeat_at FROM daemons WHERE pid=?", (self.proc.pid,)
                    ).fetchone()
                finally:
                    con.close()
            except sqlite3.Error:
                row = None
            if row is not None and row[0] != last:
                last = row[0]
                self.beats.append(float(row[0]))
            self._done.wait(0.1)

    def watchdog_gap(self) -> float:
        """Largest gap between READY/WATCHDOG=1 arrivals, up to now."""
        ready = next(t for t, m in self.stamped if m.startswith("READY=1"))
        times = [ready] + [t for t, m in self.stamped if m == "WATCHDOG=1" and t >= ready]
        times.append(time.monotonic())  # the silence since the last ping counts too
        return float(np.diff(times).max())

    def heartbeat_gap(self) -> float:
        """Largest gap between ledger heartbeats seen, counting the silence up to now."""
        return float(np.diff([*self.beats, time.time()]).max()) if self.beats else float("nan")

    def _close(self) -> None:
        self._done.set()
        self._reader.join()
        if self._poller.is_alive():
            self._poller.join()
        self.sock.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        self.log.close()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(300)
        self._close()
        return rc


def wait_rows(reports: Path, n: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while sum(rows_per_file(reports).values()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {n} rows")
        time.sleep(0.05)


def verdict(counts: Counter[str], names: list[str]) -> tuple[bool, str]:
    per_file = [counts.get(n, 0) for n in names]
    extra = set(counts) - set(names)
    ok = min(per_file) == 1 and max(per_file) == 1 and not extra
    return ok, (
        f"rows per file: min {min(per_file)}, max {max(per_file)} (must be 1); "
        f"{per_file.count(0)} missing, {sum(c > 1 for c in per_file)} duplicated, "
        f"{len(extra)} unexpected"
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=300, help="files in the kill -9 burst")
    ap.add_argument("--kills", type=int, default=3, help="kill -9s during the burst")
    ap.add_argument("--backlog", type=int, default=1500, help="files present at start")
    ap.add_argument("--watchdog-sec", type=float, default=2.0, help="emulated WatchdogSec")
    ap.add_argument("--model", type=Path, help="exported model (default: build a tinycnn)")
    ap.add_argument("--size", type=int, default=32, help="input size of the built tinycnn")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--poll", action="store_true", help="run the daemons with --poll")
    args = ap.parse_args()

    from xrwatch.serve.liveness import HEARTBEAT_SECONDS

    work = Path(tempfile.mkdtemp(prefix="xrwatch-stress-"))
    try:
        if args.model is None:
            from benchmarks.serve import build_model

            model = build_model("tinycnn", args.size, work / "model" / "model.onnx")
        else:
            model = args.model
        daemon_args = [
            "--batch-size", str(args.batch_size), "--workers", str(args.workers),
            "--stable-seconds", "0.5", "--max-wait", "0.1", "--rescan-interval", "5",
            *(["--poll", "--poll-interval", "0.5"] if args.poll else []),
        ]  # fmt: skip
        print(describe_machine())
        print(f"Python {platform.python_version()}; model {model.name}; "
              f"WatchdogSec={args.watchdog_sec:g} (emulated), ledger heartbeat every "
              f"{HEARTBEAT_SECONDS:g} s; batch {args.batch_size}, "
              f"{args.workers} workers{', --poll' if args.poll else ''}")  # fmt: skip
        all_ok = True

        # 1. kill -9 mid-burst
        incoming, reports = work / "burst" / "in", work / "burst" / "reports"
        incoming.mkdir(parents=True)
        names = [f"s{i % 7}/f{i:05d}.png" for i in range(args.files)]
        half = args.files // 2
        for i, name in enumerate(names[:half]):
            drop(incoming, name, seed=i)
        d = Daemon(incoming, reports, model, daemon_args, args.watchdog_sec)
        feeder = threading.Thread(
            target=lambda: [drop(incoming, n, seed=i) for i, n in enumerate(names) if i >= half]
        )
        feeder.start()
        gaps = []
        t0 = time.monotonic()
        for k in range(1, args.kills + 1):
            wait_rows(reports, k * args.files // (args.kills + 1))
            gaps.append(d.watchdog_gap())
            d.kill9()
            d = Daemon(incoming, reports, model, daemon_args, args.watchdog_sec)
        feeder.join()
        wait_rows(reports, args.files)
        time.sleep(1.0)  # a rescan or two: still nothing twice
        gaps.append(d.watchdog_gap())
        hb = d.heartbeat_gap()
        rc = d.stop()
        ok, text = verdict(rows_per_file(reports), names)
        gap_ok = max(gaps) < args.watchdog_sec
        all_ok &= ok and gap_ok and rc == 0
        print(f"kill -9 x{args.kills} during a burst of {args.files} files "
              f"({time.monotonic() - t0:.1f} s): {text}; largest watchdog gap "
              f"{max(gaps):.2f} s (WatchdogSec {args.watchdog_sec:g}: "
              f"{'ok' if gap_ok else 'KILLED'}); last daemon's largest heartbeat gap "
              f"{hb:.2f} s; exit {rc} on SIGTERM")  # fmt: skip

        # 2. backlog present at start
        incoming, reports = work / "backlog" / "in", work / "backlog" / "reports"
        incoming.mkdir(parents=True)
        names = [f"b{i // 500:03d}/f{i:06d}.png" for i in range(args.backlog)]
        for i, name in enumerate(names):
            path = incoming / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(100_000 + i))
        t0 = time.monotonic()
        d = Daemon(incoming, reports, model, daemon_args, args.watchdog_sec)
        ready = time.monotonic()
        wait_rows(reports, args.backlog)
        done = time.monotonic()
        gap, hb = d.watchdog_gap(), d.heartbeat_gap()
        rc = d.stop()
        ok, text = verdict(rows_per_file(reports), names)
        gap_ok = gap < args.watchdog_sec
        all_ok &= ok and gap_ok and rc == 0
        print(f"backlog of {args.backlog} files: ready in {ready - t0:.1f} s, all reported "
              f"{done - ready:.1f} s later ({args.backlog / (done - ready):.0f} files/s); "
              f"{text}; largest watchdog gap {gap:.2f} s (WatchdogSec "
              f"{args.watchdog_sec:g}: {'ok' if gap_ok else 'KILLED'}); largest ledger "
              f"heartbeat gap {hb:.2f} s (period {HEARTBEAT_SECONDS:g} s); "
              f"exit {rc} on SIGTERM")  # fmt: skip
        print("result:", "PASS" if all_ok else "FAIL")
        return 0 if all_ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
