"""Benchmark the TCP acknowledgement settings of the DICOM node: what each C-STORE waits
for on one association, with and without them, in the same run.

    .venv/bin/python benchmarks/dicom_latency.py [--instances 60] [--rounds 2]

1. Receiving (``xrwatch.dicom.gate.ack_now``): DCMTK's ``storescu`` (Nagle's algorithm
   on, its default) sends small real instances (the uncompressed DICOMs of
   ``../shared/data/xray/dicom``, new UIDs) over one association to ``xrwatch serve
   --dicom-port``, and the same instances again once the daemon is idle (duplicates:
   acknowledged, not stored): milliseconds per instance from storescu's start to its end;
   then the daemon's CPU while three associations stay open and idle for 5 s. Three
   setups of the daemon: as shipped; without the quick acknowledgement (``_TCP_QUICKACK``
   None); with pynetdicom's reactors polling as they do by themselves
   (:mod:`xrwatch.dicom.reactor_waits` not installed). Each is set through a
   ``sitecustomize`` on the daemon's path.
2. Sending (``xrwatch.dicom.sender.send_at_once``): pynetdicom, as the daemon's results
   sender, sends as many small Secondary Captures (128 x 128, 8 bits: about an SR's size)
   to DCMTK's ``storescp`` over one association, with and without ``TCP_NODELAY``:
   milliseconds per C-STORE.

Rounds alternate the order of the setups. Needs ``storescu``/``storescp`` (Debian package
dcmtk) and the train extra (to build the model the daemon loads).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dicom_receive import SHARED, make_instances  # noqa: E402
from serve import Daemon, build_model, cpu_seconds  # noqa: E402

from tests.helpers.dicom_factory import build_dataset  # noqa: E402
from tests.helpers.net import LOOPBACK, free_port  # noqa: E402
from xrwatch.sysinfo import describe as describe_machine  # noqa: E402

# what each receiving setup changes in the daemon, through a sitecustomize on its path
# (each imports the same modules, so that no setup pays an import the others do not, and
# writes a marker: a sitecustomize that failed would otherwise measure "as shipped")
SITE = (
    "import os\nimport xrwatch.dicom.gate as gate\nimport xrwatch.dicom.reactor_waits as w\n"
    "{change}\nopen(os.environ['XRWATCH_BENCH_MARKER'], 'a').write('ran\\n')\n"
)
SETUPS = {
    "as shipped": "",
    "no quick ACK": "gate._TCP_QUICKACK = None",
    "reactors poll": "w._installed = False",
}
IDLE_ASSOCIATIONS, IDLE_SECONDS = 3, 5.0


def storescu_ms(storescu: str, port: int, files: list[Path]) -> float:
    """Milliseconds per instance for one storescu association sending ``files``."""
    t = time.perf_counter()
    subprocess.run(
        [storescu, "-aet", "BENCH", "-aec", "XRWATCH", LOOPBACK, str(port), *map(str, files)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return (time.perf_counter() - t) / len(files) * 1e3


def idle_cpu(pid: int, port: int) -> float:
    """The daemon's CPU (% of a core) while :data:`IDLE_ASSOCIATIONS` associations are open
    and idle for :data:`IDLE_SECONDS`."""
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.1.1")
    assocs = [ae.associate(LOOPBACK, port, ae_title="XRWATCH") for _ in range(IDLE_ASSOCIATIONS)]
    try:
        if not all(a.is_established for a in assocs):
            raise SystemExit("the daemon refused an association")
        time.sleep(0.5)
        before = cpu_seconds(pid)
        time.sleep(IDLE_SECONDS)
        return (cpu_seconds(pid) - before) / IDLE_SECONDS * 100
    finally:
        for a in assocs:
            a.release()


def receive(
    work: Path, model: Path, files: list[Path], setup: str, storescu: str
) -> tuple[float, float, float]:
    """(ms/instance first send, ms/instance resent to the idle daemon, % of a core with
    idle associations)."""
    incoming, reports = work / "incoming", work / "reports"
    incoming.mkdir(parents=True)
    reports.mkdir()
    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE.format(change=SETUPS[setup]))
    marker = work / "site-ran"
    os.environ["XRWATCH_BENCH_MARKER"] = str(marker)  # the daemon inherits it
    port = free_port()
    args = ["--dicom-port", str(port), "--dicom-allow-ae", "BENCH"]
    d = Daemon(incoming, reports, model, args, pythonpath=(site,))
    try:
        if not marker.is_file():
            raise SystemExit(f"the daemon's sitecustomize did not run: see {work}/daemon.log")
        first = storescu_ms(storescu, port, files)
        deadline = time.time() + 300
        while len(list((reports / "json").rglob("*.json"))) < len(files):
            if time.time() > deadline:
                raise SystemExit("the daemon did not classify the first send in 300 s")
            time.sleep(0.2)
        again = storescu_ms(storescu, port, files)
        idle = idle_cpu(d.proc.pid, port)
    finally:
        d.stop()
    return first, again, idle


def small_sc(i: int) -> object:
    """A 128 x 128 8-bit Secondary Capture (16 KiB of pixels), as small as an SR."""
    import numpy as np
    from pydicom.uid import SecondaryCaptureImageStorage

    ramp = (np.arange(128 * 128, dtype=np.uint32) * (i + 1) % 256).astype(np.uint8)
    return build_dataset(
        pixels=ramp.reshape(128, 128), modality="OT", sop_class_uid=SecondaryCaptureImageStorage
    )


def send(storescp: str, work: Path, n: int, nodelay: bool) -> float:
    """ms per C-STORE from pynetdicom to storescp over one association."""
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
    from pynetdicom import AE

    from xrwatch.dicom.sender import send_at_once

    out = work / "pacs"
    out.mkdir(parents=True)
    port = free_port()
    pacs = subprocess.Popen(
        [storescp, "+xa", "-od", str(out), "-aet", "PACS", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        datasets = [small_sc(i) for i in range(n)]
        ae = AE(ae_title="XRWATCH")
        ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        for _ in range(50):  # storescp listening
            assoc = ae.associate(LOOPBACK, port, ae_title="PACS")
            if assoc.is_established:
                break
            time.sleep(0.1)
        else:
            raise SystemExit("storescp did not answer")
        if nodelay:
            send_at_once(assoc)
        t = time.perf_counter()
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0:
                raise SystemExit(f"storescp refused an instance: {status}")
        ms = (time.perf_counter() - t) / len(datasets) * 1e3
        assoc.release()
        return ms
    finally:
        pacs.terminate()
        pacs.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=60, help="instances per association")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of runs, settings alternated")
    args = ap.parse_args()
    storescu, storescp = shutil.which("storescu"), shutil.which("storescp")
    if storescu is None or storescp is None or not SHARED.is_dir():
        print("needs storescu/storescp (apt-get install dcmtk) and ../shared/data/xray/dicom",
              file=sys.stderr)  # fmt: skip
        return 2
    print(describe_machine())
    with tempfile.TemporaryDirectory(prefix="xrwatch-dicom-latency-") as tmp:
        work = Path(tmp)
        model = build_model("tinycnn", 224, work / "model" / "model.onnx")
        files = make_instances(args.instances * 3, work / "src")["-x="][: args.instances]
        kib = sum(f.stat().st_size for f in files) / len(files) / 1024
        print(f"{len(files)} uncompressed instances, {kib:.0f} KiB on average, one association")
        recv: dict[str, list[tuple[float, float, float]]] = {k: [] for k in SETUPS}
        sent: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.rounds):
            order = list(SETUPS) if r % 2 == 0 else list(reversed(SETUPS))
            for setup in order:
                first, again, idle = receive(work / f"recv{r}{len(recv[setup])}{setup[:2]}",
                                             model, files, setup, storescu)  # fmt: skip
                recv[setup].append((first, again, idle))
                print(f"  receive, {setup:13}: {first:5.1f} ms/instance; resent to the idle "
                      f"daemon {again:5.1f}; {IDLE_ASSOCIATIONS} idle associations: "
                      f"{idle:4.1f} % of a core")  # fmt: skip
            for on in (True, False) if r % 2 == 0 else (False, True):
                sent[on].append(send(storescp, work / f"send{r}{on}", len(files), on))
                label = "on " if on else "off"
                print(f"  send, TCP_NODELAY {label}: {sent[on][-1]:5.1f} ms per C-STORE")
        med = statistics.median
        print("median over rounds:")
        for setup, runs in recv.items():
            print(f"  receive, {setup:13}: {med(f for f, _, _ in runs):5.1f} ms/instance; "
                  f"idle daemon {med(a for _, a, _ in runs):5.1f}; idle associations "
                  f"{med(i for _, _, i in runs):4.1f} % of a core")  # fmt: skip
        on, off = med(sent[True]), med(sent[False])
        print(f"  send: TCP_NODELAY on {on:5.1f}, off {off:5.1f} ms per C-STORE")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
