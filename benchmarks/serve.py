"""Benchmark the folder daemon against ``classify`` on the same files, in the same run.

    .venv/bin/python benchmarks/serve.py [--files 2000] [--model M.onnx | --arch tinycnn]

1. ``classify`` baseline: :meth:`InferenceEngine.predict_paths` (what ``xrwatch classify``
   runs) over ``--classify-files`` of the same files -> files/s, measured before and after
   the daemon's burst (the mean is the baseline, so load from elsewhere affects both).
2. Burst: a real ``xrwatch serve`` process (its own process, so its memory is measurable)
   on an empty folder; ``--files`` real-size X-rays are copied in as fast as possible.
   Throughput = files / (last report written - first drop). Memory = the daemon's RSS,
   sampled every 0.5 s while it works: after warm-up (10-20 % of the files) vs. the end.
   With ``--compare-heatmaps``, twice more with ``--no-heatmaps`` and once more with
   heatmaps (A B B A, so a drift of the machine hits both alike): the extra time per file
   that writing the heatmap overlays costs the daemon, on real files.
3. Latency: files dropped one by one at half the burst throughput; latency = report JSON
   written (its mtime) - drop time; p50 and p95.

With ``--compare-tree OTHER`` (another checkout, e.g. ``git worktree add /tmp/old HASH``)
only the bursts are run, alternately with the daemon of OTHER and of this checkout (OTHER,
this, this, OTHER), with the same model, files and settings: the ratios of their time per
file and of the daemon's own CPU time per file (this / OTHER; below 1 = this checkout is
faster), after an uncounted warm-up burst. The CPU time is the steadier of the two on a
machine shared with other work.

Files are the real JPEGs in ``../shared/data/xray/real`` cycled under unique names (the
ledger keys on path + content, so each is a new file). Figures go to stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_model(arch: str, size: int, out: Path) -> Path:
    from tests.helpers.models import make_checkpoint
    from xrwatch_export.pipeline import ExportOptions, export_model

    ckpt = make_checkpoint(out.parent / "ckpt" / "best.pt", arch=arch, size=size)
    export_model(ExportOptions(source=ckpt, output=out, card=False))
    return out


def count_json(reports: Path) -> int:
    folder = reports / "json"
    return sum(len(files) for _, _, files in os.walk(folder)) if folder.exists() else 0


class Daemon:
    def __init__(
        self,
        incoming: Path,
        reports: Path,
        model: Path,
        args: list[str],
        root: Path = ROOT,
        pythonpath: tuple[Path, ...] = (),  # folders searched before root
    ) -> None:
        self.sockdir = tempfile.mkdtemp(prefix="xrwb", dir="/tmp")
        self.sock_path = os.path.join(self.sockdir, "n")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.log = open(reports.parent / "daemon.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "xrwatch", "serve", str(incoming), "--model", str(model),
                "--reports", str(reports), "--log-level", "WARNING", *args,
            ],
            cwd=root, env=dict(
                os.environ,
                NOTIFY_SOCKET=self.sock_path,
                PYTHONPATH=os.pathsep.join(map(str, [*pythonpath, root])),
            ),
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.sock.settimeout(120)
        while b"READY=1" not in self.sock.recv(4096):
            pass

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(120)
        self.sock.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        self.log.close()
        return rc


def burst(
    work: Path,
    model: Path,
    daemon_args: list[str],
    sources: list[Path],
    files: int,
    root: Path = ROOT,
) -> tuple[float, float, list[tuple[int, float]], float, float]:
    """Drop ``files`` copies into an idle daemon's empty folder as fast as possible;
    ``(files/s from the first drop to the last report, seconds the drop took, (reports
    written, RSS MiB) samples every 0.5 s, RSS when ready, the daemon's CPU seconds from
    ready to the last report)``."""
    incoming, reports = work / "incoming", work / "reports"
    incoming.mkdir(parents=True)
    d = Daemon(incoming, reports, model, daemon_args, root)
    samples: list[tuple[int, float]] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            samples.append((count_json(reports), rss_mib(d.proc.pid)))
            stop_sampling.wait(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    rss_start = rss_mib(d.proc.pid)
    cpu_start = cpu_seconds(d.proc.pid)
    t_first = time.time()
    for i in range(files):  # studies of up to 500 files, each in a folder
        src = sources[i % len(sources)]
        folder = incoming / f"d{i // 500:02d}"
        folder.mkdir(exist_ok=True)
        shutil.copyfile(src, folder / f"{i:05d}{src.suffix}")
    t_dropped = time.time()
    while count_json(reports) < files:
        time.sleep(0.05)
    last = max(p.stat().st_mtime for p in (reports / "json").rglob("*.json"))
    cpu = cpu_seconds(d.proc.pid) - cpu_start
    stop_sampling.set()
    sampler.join()
    assert d.stop() == 0
    return files / (last - t_first), t_dropped - t_first, samples, rss_start, cpu


def serving_from(root: Path) -> Path:
    """The daemon module a ``xrwatch serve`` started as :class:`Daemon` does would run."""
    out = subprocess.run(
        [sys.executable, "-c", "import xrwatch.serve.daemon as d; print(d.__file__)"],
        cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(out.stdout.strip())


def compare_trees(
    other: Path, work: Path, model: Path, daemon_args: list[str], sources: list[Path], files: int
) -> int:
    """Bursts with OTHER's daemon and this one's, OTHER / this / this / OTHER."""
    other = other.resolve()
    for root in (other, ROOT):
        module = serving_from(root)
        if not module.is_relative_to(root):
            print(f"{root}: its daemon would be imported from {module}", file=sys.stderr)
            return 2
        print(f"daemon of {root}: {module}")
    # a first burst pays for cold caches (the source files, the model): not counted
    burst(work / "warm-up", model, daemon_args, sources, max(1, files // 4), other)
    order = [other, ROOT, ROOT, other]
    runs = [burst(work / f"compare{i}", model, daemon_args, sources, files, root)
            for i, root in enumerate(order)]  # fmt: skip
    fps = [run[0] for run in runs]
    cpu_ms = [run[4] / files * 1000 for run in runs]  # the daemon's CPU time per file

    def ratio(per_file: list[float]) -> float:
        this = statistics.mean(v for v, r in zip(per_file, order, strict=True) if r == ROOT)
        them = statistics.mean(v for v, r in zip(per_file, order, strict=True) if r == other)
        return this / them

    print(f"daemon bursts of {files}, {other} / this / this / {other}: "
          f"{' / '.join(f'{f:.1f}' for f in fps)} files/s; "
          f"{' / '.join(f'{c:.1f}' for c in cpu_ms)} CPU ms per file (the daemon's own, "
          "less moved by other load); this / other: time per file "
          f"{ratio([1 / f for f in fps]):.3f}, CPU per file {ratio(cpu_ms):.3f}")  # fmt: skip
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=2000, help="files in the burst")
    ap.add_argument("--latency-files", type=int, default=200, help="files in the paced phase")
    ap.add_argument("--classify-files", type=int, default=400, help="files for the baseline")
    ap.add_argument("--model", type=Path, help="exported model (default: build --arch)")
    ap.add_argument("--arch", default="tinycnn", help="architecture to build when no --model")
    ap.add_argument("--size", type=int, default=224, help="input size when building")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stable-seconds", type=float, default=2.0)
    ap.add_argument("--max-wait", type=float, default=0.25)
    ap.add_argument(
        "--compare-heatmaps",
        action="store_true",
        help="also run the burst with --no-heatmaps and print what the heatmaps cost",
    )
    ap.add_argument(
        "--compare-tree",
        type=Path,
        help="another checkout: run only the bursts, its daemon and this one's alternately",
    )
    args = ap.parse_args()
    from xrwatch.sysinfo import describe

    print(describe())  # the CPU, its ISA features and ONNX Runtime: what the figures need

    sources = sorted(p for p in SHARED.rglob("*") if p.is_file())
    if not sources:
        print(f"no images under {SHARED}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="xrwatch-bench-"))
    try:
        model = args.model or build_model(args.arch, args.size, work / "model" / "model.onnx")
        from xrwatch.engine import InferenceEngine

        engine = InferenceEngine(model)
        print(f"model {model.name}: {engine.meta.name}, input {engine.spec.size}px, "
              f"provider {engine.provider}; {len(sources)} source images, "
              f"{sum(p.stat().st_size for p in sources) / len(sources) / 1024:.0f} KiB avg; "
              f"{os.cpu_count()} CPUs")  # fmt: skip

        # 1. classify baseline, same files
        base = [sources[i % len(sources)] for i in range(args.classify_files)]
        engine.predict_paths(base[:16], batch_size=args.batch_size)  # warm-up

        def classify() -> float:
            t0 = time.perf_counter()
            results = engine.predict_paths(base, batch_size=args.batch_size)
            assert all(r.ok for r in results)
            return len(base) / (time.perf_counter() - t0)

        classify_before = classify()

        daemon_args = [
            "--batch-size", str(args.batch_size), "--workers", str(args.workers),
            "--stable-seconds", str(args.stable_seconds), "--max-wait", str(args.max_wait),
        ]  # fmt: skip

        if args.compare_tree is not None:
            return compare_trees(args.compare_tree, work, model, daemon_args, sources, args.files)

        # 2. burst
        burst_fps, drop_s, samples, rss_start, _ = burst(
            work / "burst", model, daemon_args, sources, args.files
        )

        def rss_at(lo: float, hi: float) -> float:
            window = [rss for n, rss in samples if lo * args.files <= n <= hi * args.files]
            return max(window) if window else float("nan")

        early, middle, late = rss_at(0.1, 0.2), rss_at(0.45, 0.55), rss_at(0.9, 1.0)
        peak = max(rss for _, rss in samples)
        # the machine may be shared: measure classify again, compare with the mean
        classify_after = classify()
        classify_fps = (classify_before + classify_after) / 2
        print(f"classify (predict_paths, batch {args.batch_size}): {classify_before:.1f} "
              f"files/s before the daemon run, {classify_after:.1f} after; "
              f"mean {classify_fps:.1f}")  # fmt: skip
        print(f"daemon burst of {args.files}: dropped in {drop_s:.1f} s, "
              f"{burst_fps:.1f} files/s = {burst_fps / classify_fps:.2f}x classify")  # fmt: skip
        print(f"daemon RSS: {rss_start:.0f} MiB when ready (before the first batch); "
              f"{early:.0f} MiB at 10-20 % of files, {middle:.0f} MiB at 45-55 %, "
              f"{late:.0f} MiB at 90-100 %; peak {peak:.0f} MiB")  # fmt: skip
        if args.compare_heatmaps:
            # A B B A: the burst above, two without heatmaps, one more with them; a drift of
            # the machine (the disk catching up on earlier bursts) hits both sides alike
            plain = [
                burst(work / f"plain{i}", model, [*daemon_args, "--no-heatmaps"], sources,
                      args.files)[0]
                for i in (1, 2)
            ]  # fmt: skip
            again = burst(work / "burst2", model, daemon_args, sources, args.files)[0]
            with_maps = [burst_fps, again]
            cost = statistics.mean(1 / f for f in with_maps) / statistics.mean(1 / f for f in plain)
            print(f"daemon bursts of {args.files}, with heatmaps / without / without / with: "
                  f"{burst_fps:.1f} / {plain[0]:.1f} / {plain[1]:.1f} / {again:.1f} files/s; "
                  f"without heatmaps {statistics.mean(plain) / classify_fps:.2f}x classify; "
                  f"writing heatmaps costs {cost - 1:.1%} more time per file")  # fmt: skip

        # 3. latency at half the burst rate
        incoming2, reports2 = work / "incoming2", work / "reports2"
        incoming2.mkdir()
        d = Daemon(incoming2, reports2, model, daemon_args)
        gap = 2.0 / burst_fps
        drops: dict[str, float] = {}
        for i in range(args.latency_files):
            src = sources[i % len(sources)]
            name = f"l{i:05d}{src.suffix}"
            tmp = incoming2 / f".{name}.part"
            shutil.copyfile(src, tmp)
            drops[name] = time.time()
            os.rename(tmp, incoming2 / name)
            time.sleep(gap)
        while count_json(reports2) < args.latency_files:
            time.sleep(0.05)
        assert d.stop() == 0
        lat = sorted(
            (reports2 / "json" / f"{name}.json").stat().st_mtime - t for name, t in drops.items()
        )
        p50 = statistics.median(lat)
        p95 = lat[int(0.95 * (len(lat) - 1))]
        bound = 2 * args.stable_seconds + args.batch_size / classify_fps + args.max_wait
        print(f"latency at {1 / gap:.1f} files/s (rename-in): p50 {p50 * 1000:.0f} ms, "
              f"p95 {p95 * 1000:.0f} ms (target p50 < {bound:.2f} s = 2 x stability "
              f"{args.stable_seconds} s + one batch)")  # fmt: skip
        ok_tp = burst_fps >= 0.8 * classify_fps
        ok_lat = p50 < bound
        ok_mem = late - early < 25
        print(f"targets: throughput >= 0.8x classify: {'met' if ok_tp else 'MISSED'}; "
              f"p50 latency: {'met' if ok_lat else 'MISSED'}; "
              f"memory flat (< 25 MiB after warm-up): {'met' if ok_mem else 'MISSED'}")  # fmt: skip
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
