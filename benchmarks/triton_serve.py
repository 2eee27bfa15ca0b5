"""The folder daemon with its model on a Triton server on loopback vs. the local engine.

    .venv/bin/python benchmarks/triton_serve.py [--files 400] [--model M.onnx] [--rounds 2]

Needs the ``triton`` extra and a Triton server environment (docs/triton.md;
``XRWATCH_TRITON_ENV``, default ``../tritonenv``). One ``tritonserver`` (the one bundled in
``nvidia-pytriton``) serves the model behind the Python backend with ONNX Runtime on the
CPU, on 127.0.0.1; the daemon runs in this process (``Daemon`` with ``once``) on a backlog
of ``--files`` real X-rays (``../shared/data/xray/real``, cycled under unique names), with
its default settings (heatmaps on), once with the local engine and once with
:class:`xrwatch.remote.triton.TritonEngine`, alternately (local, triton, triton, local per
two rounds) so that load from elsewhere hits both alike. Throughput = files / (the last
result recorded - the daemon ready). Then ``--shared`` ``xrwatch serve --once --triton``
processes at once (each its own folder, ``--files`` each), all on the one server: their
combined files/s, start-up included.

Prints files/s of each run, the ratio triton/local of the medians, and the CPU. On one
machine the server and the daemon share the cores; on a fleet the server has its own GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data" / "xray" / "real"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical cores"
    except OSError:
        pass
    return f"unknown CPU, {os.cpu_count()} logical cores"


def fill(folder: Path, sources: list[Path], n: int) -> None:
    """``n`` files under unique names (hard links where possible: no copy of the bytes)."""
    folder.mkdir(parents=True)
    for i in range(n):
        src = sources[i % len(sources)]
        dst = folder / f"{i:05d}-{src.name}"
        try:
            os.link(src, dst)
        except OSError:
            dst.write_bytes(src.read_bytes())


def run_daemon(incoming: Path, reports: Path, model: Path, factory, batch_size: int) -> float:
    """Run ``serve --once`` on the backlog; seconds from ready to the last result."""
    from xrwatch.serve.config import ServeConfig
    from xrwatch.serve.daemon import Daemon

    config = ServeConfig(
        incoming, model, reports, once=True, stable_seconds=0.1, batch_size=batch_size
    )
    daemon = Daemon(config, engine_factory=factory)
    started: list[float] = []

    def mark() -> None:
        daemon.ready.wait()
        started.append(time.monotonic())

    watcher = threading.Thread(target=mark, daemon=True)
    watcher.start()
    code = daemon.run()
    ended = time.monotonic()
    daemon.ready.set()
    watcher.join()
    if code != 0:
        raise SystemExit(f"the daemon exited {code} on {incoming}")
    return ended - started[0]


def count_rows(reports: Path) -> int:
    with (reports / "predictions.csv").open(encoding="utf-8") as fh:
        return sum(1 for _ in fh) - 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of (local, triton) runs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--shared", type=int, default=2, help="daemons sharing the server")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from xrwatch.defaults import resolve_model
    from xrwatch.engine import InferenceEngine
    from xrwatch.inputs import expand_inputs
    from xrwatch.remote.localserver import LocalTriton, default_env_root, find_server_env
    from xrwatch.remote.repository import write_python_repository
    from xrwatch.remote.triton import TritonEngine

    model = resolve_model(args.model)
    sources = expand_inputs([SHARED])
    if not sources:
        raise SystemExit(f"no images under {SHARED}")
    env_root = default_env_root()
    if env_root is None:
        raise SystemExit("no Triton server environment: set XRWATCH_TRITON_ENV (docs/triton.md)")
    env = find_server_env(env_root)
    print(f"CPU: {cpu_name()}")
    print(f"model: {model.name}; {args.files} files per run, batch {args.batch_size}, heatmaps on")

    with tempfile.TemporaryDirectory(prefix="xrwatch-triton-bench-") as tmp:
        work = Path(tmp)
        write_python_repository(work / "repo", model, max_batch_size=max(32, args.batch_size))
        server = LocalTriton(env, work / "repo", work)
        server.start()
        try:

            def local(cfg):
                return InferenceEngine(
                    cfg.model, use_gpu=False, low_confidence=cfg.low_confidence,
                    scope_guard=cfg.scope_guard,
                )  # fmt: skip

            def remote(cfg):
                return TritonEngine(
                    server.url, low_confidence=cfg.low_confidence, scope_guard=cfg.scope_guard
                )

            rates: dict[str, list[float]] = {"local": [], "triton": []}
            order = []
            for r in range(args.rounds):
                order += ["local", "triton"] if r % 2 == 0 else ["triton", "local"]
            for n, kind in enumerate(order):
                incoming, reports = work / f"in{n}", work / f"out{n}"
                fill(incoming, sources, args.files)
                factory = local if kind == "local" else remote
                seconds = run_daemon(incoming, reports, model, factory, args.batch_size)
                done = count_rows(reports)
                if done != args.files:
                    raise SystemExit(f"{kind}: {done} results for {args.files} files")
                rates[kind].append(done / seconds)
                print(f"  {kind:6s} run {n + 1}: {done / seconds:7.1f} files/s ({seconds:.1f} s)")
            lm, tm = statistics.median(rates["local"]), statistics.median(rates["triton"])
            print(f"local engine : {lm:7.1f} files/s (median of {len(rates['local'])})")
            print(f"via Triton   : {tm:7.1f} files/s (median of {len(rates['triton'])})")
            print(f"ratio triton/local: {tm / lm:.2f}")

            if args.shared > 1:  # separate `xrwatch serve --once --triton` processes
                procs = []
                for i in range(args.shared):
                    incoming, reports = work / f"shared-in{i}", work / f"shared-out{i}"
                    fill(incoming, sources, args.files)
                    procs.append((reports, [
                        sys.executable, "-m", "xrwatch", "serve", str(incoming), "--once",
                        "--reports", str(reports), "--stable-seconds", "0.1",
                        "--batch-size", str(args.batch_size), "--triton", server.url,
                        "--log-level", "WARNING",
                    ]))  # fmt: skip
                began = time.monotonic()
                running = [subprocess.Popen(cmd, cwd=ROOT) for _, cmd in procs]
                codes = [p.wait(timeout=3600) for p in running]
                seconds = time.monotonic() - began
                if any(codes):
                    raise SystemExit(f"a shared daemon exited {codes}")
                total = sum(count_rows(reports) for reports, _ in procs)
                print(
                    f"{args.shared} daemons (processes) sharing the server: "
                    f"{total / seconds:7.1f} files/s together ({total} files, {seconds:.1f} s, "
                    "including each daemon's start-up)"
                )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
