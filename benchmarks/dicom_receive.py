"""Benchmark the DICOM receiver against the folder: instances/s received and classified
over C-STORE vs. the same files dropped into INCOMING, in the same run.

    .venv/bin/python benchmarks/dicom_receive.py [--instances 200] [--model M.onnx]

The instances are the real DICOMs in ``../shared/data/xray/dicom`` (CR, DX, SC; JPEG,
JPEG 2000 and uncompressed), cycled with new SOP Instance UIDs so that each is a new
instance. Each phase runs a fresh ``xrwatch serve`` (same options) and measures from the
first byte sent (or dropped) to the last report JSON written:

1. folder: the files are copied into INCOMING (temp name, then rename), as fast as possible;
2. C-STORE: DCMTK's ``storescu`` sends them to ``--dicom-port`` (one association per
   transfer syntax family), as a modality would.

Both daemons do the same work per instance: each also writes the DICOM SR of every
instance (REPORTS/dicom; the folder daemon with ``--dicom-sr``), which competes for the
same CPUs. (Before, only the C-STORE daemon built SRs, so the ratio weighed the SR
builder's CPU against the receiver.) Each phase prints the rate to the last report and,
apart, the time until the last SR is written; ``--no-sr-on-folder`` measures the old way.
After each C-STORE phase the same instances are sent again to the now idle daemon
(duplicates: acknowledged, not stored): the time of the transfer and the receiver alone.
``--max-pdu`` sets the receiver's ``--dicom-max-pdu``; ``--decode-in`` both daemons'
``--decode-in`` (default ``auto``, as a user runs them: the C-STORE daemon, with its port,
decodes in worker processes, the folder daemon in threads; ``threads`` is the daemon before
:mod:`xrwatch.serve.decoders`). ``--warm-up N``: each daemon first classifies N other
instances, dropped or sent the same way and waited for (reports and SRs), before the
measured ones, so that what a daemon does once after its start (the fork server's start,
about a second, ``benchmarks/decode.py --worker-memory``; ONNX Runtime's
first runs) is left out of the figure.

``--gil-profile FILE`` samples the first C-STORE daemon with ``py-spy record --gil`` (only
the thread holding the interpreter lock; py-spy installed apart, ``pip install py-spy``)
from the first send to the last report, writes the raw samples to FILE and prints each
thread's share of the samples (association threads pooled by kind) and the functions most
often on the lock's stack. ``--gil-profile-resend FILE`` does the same for the resend to
the idle daemon (the receiver's work alone).

Needs ``storescu`` (Debian package dcmtk) and the train extra (to build the model).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve import Daemon, build_model, count_json, cpu_seconds  # noqa: E402

from tests.helpers.net import free_port, storescu_option  # noqa: E402
from xrwatch.sysinfo import describe as describe_machine  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "xray" / "dicom"


def make_instances(n: int, out: Path, prefix: str = "i") -> dict[str, list[Path]]:
    """``n`` instances (new UIDs) grouped by the storescu option for their syntax, in files
    named ``{prefix}NNNNN.dcm``."""
    import pydicom
    from pydicom.uid import generate_uid

    sources = sorted(SHARED.glob("*.dcm"))
    groups: dict[str, list[Path]] = defaultdict(list)
    out.mkdir(parents=True)
    for i in range(n):
        ds = pydicom.dcmread(sources[i % len(sources)], force=True)
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        if getattr(ds, "file_meta", None) is not None and "TransferSyntaxUID" in ds.file_meta:
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ts = str(ds.file_meta.TransferSyntaxUID)
        else:
            ts = ""
        path = out / f"{prefix}{i:05d}.dcm"
        ds.save_as(path)
        groups[storescu_option(ts)].append(path)
    return groups


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its live descendants (e.g. an SR
    builder process): the figure that measures the code on a machine shared with others."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            total += cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue  # ended meanwhile
    return total


def wait_reports(reports: Path, n: int, timeout: float = 1800) -> float:
    deadline = time.monotonic() + timeout
    while count_json(reports) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {count_json(reports)} of {n} reports")
        time.sleep(0.02)
    return time.perf_counter()


def wait_srs(reports: Path, n: int, timeout: float = 600) -> tuple[int, float]:
    """``(SRs written, when)``: once all ``n`` are, or after ``timeout`` seconds."""
    deadline = time.perf_counter() + timeout
    srs = 0
    while time.perf_counter() < deadline:
        srs = sum(1 for _ in (reports / "dicom").rglob("*.SR.dcm"))
        if srs >= n:
            break
        time.sleep(0.05)
    return srs, time.perf_counter()


def drop(files: list[Path], incoming: Path) -> None:
    for p in files:
        tmp = incoming / f".{p.name}.tmp"
        shutil.copyfile(p, tmp)
        os.replace(tmp, incoming / p.name)


def folder_phase(
    work: Path, files: list[Path], model: Path, common: list[str], srs: bool, warm: list[Path]
) -> float:
    """Drop ``files`` into INCOMING (temp name, rename); instances/s to the last report.
    ``warm``: dropped first and waited for (reports and SRs), not measured."""
    incoming, reports = work / "in", work / "rep"
    incoming.mkdir(parents=True)
    d = Daemon(incoming, reports, model, [*common, *(["--dicom-sr"] if srs else [])])
    if warm:
        drop(warm, incoming)
        wait_reports(reports, len(warm))
        if srs:
            wait_srs(reports, len(warm))
    c0 = tree_cpu(d.proc.pid)
    t0 = time.perf_counter()
    drop(files, incoming)
    t1 = wait_reports(reports, len(warm) + len(files))
    written, t_sr = wait_srs(reports, len(warm) + len(files)) if srs else (0, t1)
    written -= len(warm) if srs else 0
    cpu_ms = 1000 * (tree_cpu(d.proc.pid) - c0) / len(files)
    d.stop()
    rate = len(files) / (t1 - t0)
    print(f"  folder:  {rate:6.1f} instances/s (drop -> last report)"
          + (f"; all {written} SRs written after {t_sr - t0:.1f} s" if srs else "")
          + f"; daemon CPU {cpu_ms:.1f} ms/instance")  # fmt: skip
    return rate, len(files) / (t_sr - t0), cpu_ms


def dicom_phase(
    work: Path,
    groups: dict[str, list[Path]],
    model: Path,
    common: list[str],
    storescu: str,
    max_pdu: int | None = None,
    gil_profile: Path | None = None,
    warm: dict[str, list[Path]] | None = None,
    resend_profile: Path | None = None,
) -> float:
    """storescu to the receiver; instances/s from the first send to the last report.
    ``warm``: sent first and waited for (reports and SRs), not measured."""
    incoming, reports = work / "in", work / "rep"
    incoming.mkdir(parents=True)
    port = free_port()
    receiver = ["--dicom-port", str(port), "--dicom-host", "127.0.0.1", "--dicom-allow-ae", "BENCH",
                *(["--dicom-max-pdu", str(max_pdu)] if max_pdu else [])]  # fmt: skip
    d = Daemon(incoming, reports, model, [*common, *receiver])
    n = sum(len(g) for g in groups.values())
    w = sum(len(g) for g in (warm or {}).values())
    if warm:
        send(storescu, port, warm)
        wait_reports(reports, w)
        wait_srs(reports, w)
    spy = start_gil_profile(d.proc.pid, gil_profile) if gil_profile else None
    c0 = tree_cpu(d.proc.pid)
    t0 = time.perf_counter()
    sender_cpu = send(storescu, port, groups)
    t_sent = time.perf_counter()
    t1 = wait_reports(reports, w + n)
    if spy is not None and gil_profile is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        gil_summary(gil_profile)
    srs, t_sr = wait_srs(reports, w + n)
    srs -= w
    cpu_ms = 1000 * (tree_cpu(d.proc.pid) - c0) / n
    # the same instances again, to the daemon now idle: acknowledged as duplicates (no
    # fsync, nothing classified), so this is the cost of the transfer and the receiver alone
    spy = start_gil_profile(d.proc.pid, resend_profile) if resend_profile else None
    c2, t2 = tree_cpu(d.proc.pid), time.perf_counter()
    send(storescu, port, groups)
    t_again = time.perf_counter() - t2
    if spy is not None and resend_profile is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        print("  the resend to the idle daemon:")
        gil_summary(resend_profile)
    again_ms = 1000 * (tree_cpu(d.proc.pid) - c2) / n
    d.stop()
    rate = n / (t1 - t0)
    print(f"  C-STORE: {rate:6.1f} instances/s (first send -> last report); all acknowledged "
          f"after {t_sent - t0:.1f} s, all {srs} SRs written after {t_sr - t0:.1f} s; "
          f"sent again to the idle daemon: acknowledged in {t_again:.1f} s "
          f"({again_ms:.1f} CPU ms/instance); "
          f"daemon CPU {cpu_ms:.1f} ms/instance; storescu CPU "
          f"{1000 * sender_cpu / n:.1f} ms/instance")  # fmt: skip
    return rate, n / (t_sr - t0), cpu_ms


def start_gil_profile(pid: int, out: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).is_file():
        raise SystemExit("--gil-profile needs py-spy (pip install py-spy)")
    cmd = [spy, "record", "--gil", "--threads", "--rate", "200", "--format", "raw",
           "-o", str(out), "--pid", str(pid)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attached
    return proc


def gil_summary(raw: Path, top: int = 12) -> None:
    """Print each thread kind's share of the lock-holding samples, and the top functions."""
    threads: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    own: Counter[str] = Counter()  # the function at the top of the stack: its own time
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        name = re.sub(r"^thread \(\d+\): ", "", frames[0])
        name = re.sub(r"@\d+$", "", re.sub(r"Thread-\d+ \(run_reactor\)", "DUL reactor", name))
        threads[name] += n
        if len(frames) > 1:
            own[re.sub(r":\d+\)$", ")", frames[-1])] += n
        for frame in set(re.sub(r":\d+\)$", ")", f) for f in frames[1:]):
            if "threading.py" not in frame and "concurrent/futures" not in frame:
                functions[frame] += n
    print(f"  interpreter lock held in {total} samples:")
    for name, n in threads.most_common(top):
        print(f"    {100 * n / total:5.1f} %  thread {name}")
    print("  functions on the lock holder's stack:")
    for frame, n in functions.most_common(top):
        print(f"    {100 * n / total:5.1f} %  {frame}")
    print("  functions at the top of that stack (their own time):")
    for frame, n in own.most_common(top):
        print(f"    {100 * n / total:5.1f} %  {frame}")


def send(storescu: str, port: int, groups: dict[str, list[Path]]) -> float:
    """One storescu per transfer syntax family, all at once; wait for them. Returns their
    CPU seconds (the sender's share of the machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    senders = [
        subprocess.Popen(
            [storescu, option, "-aet", "BENCH", "-aec", "XRWATCH", "127.0.0.1", str(port),
             *map(str, group)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        for option, group in sorted(groups.items())
    ]  # fmt: skip
    for s in senders:
        _, err = s.communicate()
        if s.returncode != 0:
            raise SystemExit(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # storescu only: the daemon lives on
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--instances", type=int, default=200, help="instances per phase")
    ap.add_argument("--model", type=Path, help="exported model (default: build --arch)")
    ap.add_argument("--arch", default="tinycnn", help="architecture to build when no --model")
    ap.add_argument("--size", type=int, default=224, help="input size when building")
    ap.add_argument("--rounds", type=int, default=2, help="folder/C-STORE pairs, alternated")
    ap.add_argument("--max-pdu", type=int, help="the receiver's --dicom-max-pdu (default its own)")
    ap.add_argument(
        "--warm-up",
        type=int,
        default=0,
        help="instances each daemon classifies first, not measured (one-time starts out)",
    )
    ap.add_argument(
        "--decode-in",
        choices=("auto", "threads", "processes"),
        default="auto",
        help="both daemons' --decode-in (default auto: processes with a DICOM port)",
    )
    ap.add_argument(
        "--gil-profile",
        type=Path,
        help="py-spy --gil samples of the first C-STORE daemon to this file, summarised",
    )
    ap.add_argument(
        "--gil-profile-resend",
        type=Path,
        help="the same sampling, of the first C-STORE daemon's idle resend (the receiver alone)",
    )
    ap.add_argument(
        "--no-sr-on-folder",
        dest="folder_srs",
        action="store_false",
        help="the folder daemon writes no SRs (unequal work: the measure before)",
    )
    args = ap.parse_args()
    storescu = shutil.which("storescu")
    if storescu is None or not SHARED.is_dir():
        print(
            "needs storescu (apt-get install dcmtk) and ../shared/data/xray/dicom", file=sys.stderr
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="xrwatch-dicom-bench-"))
    try:
        model = args.model or build_model(args.arch, args.size, work / "model" / "model.onnx")
        groups = make_instances(args.instances, work / "instances")
        files = [p for g in groups.values() for p in g]
        warm = make_instances(args.warm_up, work / "warm", "w") if args.warm_up else {}
        warm_files = [p for g in warm.values() for p in g]
        total_mib = sum(p.stat().st_size for p in files) / 2**20
        syntaxes = ", ".join(f"{k}:{len(v)}" for k, v in sorted(groups.items()))
        print(describe_machine())
        print(f"model {model.name} "
              f"({args.arch}, {args.size}px); {len(files)} instances, {total_mib:.1f} MiB; "
              f"storescu groups {syntaxes}; --decode-in {args.decode_in}; "
              f"--warm-up {args.warm_up}")  # fmt: skip
        common = ["--batch-size", "8", "--workers", "2", "--decode-in", args.decode_in]
        folder, dicom = [], []
        for r in range(args.rounds):  # alternated, so load from elsewhere hits both
            folder.append(
                folder_phase(work / f"f{r}", files, model, common, args.folder_srs, warm_files)
            )
            profile = args.gil_profile if r == 0 else None
            dicom.append(
                dicom_phase(
                    work / f"d{r}",
                    groups,
                    model,
                    common,
                    storescu,
                    args.max_pdu,
                    profile,
                    warm,
                    args.gil_profile_resend if r == 0 else None,
                )
            )
        f_mean, d_mean = (sum(x[0] for x in v) / len(v) for v in (folder, dicom))
        print(f"folder:  {f_mean:6.1f} instances/s (rounds: "
              f"{', '.join(f'{x[0]:.1f}' for x in folder)})")  # fmt: skip
        print(f"C-STORE: {d_mean:6.1f} instances/s (rounds: "
              f"{', '.join(f'{x[0]:.1f}' for x in dicom)})")  # fmt: skip
        same = "both write SRs" if args.folder_srs else "only C-STORE writes SRs"
        print(f"C-STORE / folder = {d_mean / f_mean:.2f} ({same}; to the last report)")
        if args.folder_srs:
            f_all, d_all = (sum(x[1] for x in v) / len(v) for v in (folder, dicom))
            print(f"C-STORE / folder = {d_all / f_all:.2f} (to the last SR: all the work done)")
        f_cpu, d_cpu = (sum(x[2] for x in v) / len(v) for v in (folder, dicom))
        print(
            f"daemon CPU per instance: folder {f_cpu:.1f} ms, C-STORE {d_cpu:.1f} ms; "
            f"folder / C-STORE = {f_cpu / d_cpu:.2f} (CPU-bound throughput ratio)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
