"""Attacks on the DICOM receiver of a real ``xrwatch serve`` (issue #21, items 2, 3, 4):
a symlinked spool, slow-loris / half-open / garbage connections with SIGTERM on top,
data sets over the size limit (idle peers and a wedged receiver: test_receiver_wedge.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicom_tools import LOOPBACK, free_port, sop_uid, storescu
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from serve_harness import csv_rows, wait_for

from tests.helpers.dicom_factory import gradient, write_dicom

pytestmark = pytest.mark.slow

HALF_RQ = b"\x01\x00\x00\x00\x01\x00\x00\x01"  # an A-ASSOCIATE-RQ header and 2 of 256 bytes
PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"


def _args(port: int, *extra: str) -> tuple[str, ...]:
    return (
        "--dicom-port", str(port), "--dicom-host", LOOPBACK, "--dicom-allow-ae", "MODALITY",
        *extra,
    )  # fmt: skip


def _dx(folder: Path, n: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_dicom(folder / f"dx{i}.dcm", pixels=gradient(40 + i, 36)) for i in range(n)]


def _pdf(path: Path, size: int) -> Path:
    """An Encapsulated PDF of ``size`` bytes: not a radiograph (acknowledged, dropped)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = PDF_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = PDF_STORAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.MIMETypeOfEncapsulatedDocument = "DOC", "application/pdf"
    ds.EncapsulatedDocument = b"%PDF" + bytes(size - 4)
    ds.save_as(path, enforce_file_format=True)
    return path


def _messages(d: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in d.log_text().splitlines() if line.startswith("{")]


def test_a_symlinked_spool_is_refused_and_nothing_is_written_through_it(
    folders, daemons, dcmtk, tmp_path
) -> None:
    incoming, reports = folders
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".victim.part").write_bytes(b"not the daemon's")  # start-up clean-up bait
    (incoming / "dicom").symlink_to(outside)
    port = free_port()
    d = daemons(incoming, reports, *_args(port)).start(wait_ready=False)
    assert d.wait(60) == 2  # a start-up error, with one line saying why
    assert "spool is a symbolic link" in d.log_text()
    assert "Traceback" not in d.log_text()
    assert sorted(p.name for p in outside.iterdir()) == [".victim.part"]

    # swapped for a link while the daemon runs: refused per C-STORE, nothing written there
    (incoming / "dicom").unlink()
    files = _dx(tmp_path / "send", 2)
    d = daemons(incoming, reports, *_args(port)).start()
    (incoming / "dicom").rename(incoming / "spool-moved")
    (incoming / "dicom").symlink_to(outside)
    sent = storescu(dcmtk, port, files[:1])
    assert sent[0].returncode != 0  # storescu: a failure status (A700, the spool's reason)
    # a study folder that is a link: the same
    (incoming / "dicom").unlink()
    (incoming / "spool-moved").rename(incoming / "dicom")
    study = pydicom.dcmread(files[1]).StudyInstanceUID
    (incoming / "dicom" / study).symlink_to(outside)
    sent = storescu(dcmtk, port, files[1:])
    assert sent[0].returncode != 0
    # the spool's .parts, where data sets stream in, swapped for a link: the same
    (incoming / "dicom" / study).unlink()
    (incoming / "dicom" / ".parts").rename(incoming / "parts-moved")
    (incoming / "dicom" / ".parts").symlink_to(outside)
    sent = storescu(dcmtk, port, files[1:])
    assert sent[0].returncode != 0
    assert d.stop() == 0
    assert sorted(p.name for p in outside.iterdir()) == [".victim.part"]
    # nothing received was kept (the link itself is the folder watch's error row)
    assert [r for r in csv_rows(reports) if r["status"] == "ok"] == []
    log = d.log_text()
    assert "spool is a symbolic link" in log and "cannot store" in log
    assert "/dicom/.parts" in log  # the refusal names the link
    # .parts a link at start-up: refused with the spool's reason, the bait left alone
    d = daemons(incoming, reports, *_args(port)).start(wait_ready=False)
    assert d.wait(60) == 2
    assert "spool is a symbolic link" in d.log_text()
    assert sorted(p.name for p in outside.iterdir()) == [".victim.part"]


def _open(port: int, payload: bytes) -> socket.socket:
    s = socket.create_connection((LOOPBACK, port), timeout=10)
    if payload:
        s.sendall(payload)
    return s


def test_slow_loris_and_garbage_neither_keep_a_sender_out_nor_delay_sigterm(
    folders, daemons, dcmtk, tmp_path
) -> None:
    incoming, reports = folders
    port = free_port()
    # timeouts far beyond the test: what lets the sender in is the gate, not a timeout
    d = daemons(
        incoming, reports, *_args(port, "--dicom-acse-timeout", "600",
                                   "--dicom-network-timeout", "600"),
    ).start()  # fmt: skip
    if shutil.which("ss"):  # the kernel's queue of pending connections (ss: Send-Q)
        listening = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        # socketserver's default, 5, dropped the SYNs of this burst (1 s SYN retries: 34 s)
        assert int(listening[2]) >= 128, listening
    files = _dx(tmp_path / "send", 1)
    held = [_open(port, HALF_RQ) for _ in range(10)]  # half-open association requests
    garbage = [_open(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(200)]
    try:
        sent = time.monotonic()
        done = storescu_with_timeout(dcmtk, port, files, 30)
        assert done.returncode == 0, done.stderr
        print(f"storescu stored past 10 slow-loris + 200 garbage: {time.monotonic() - sent:.1f} s")
        wait_for(lambda: len(csv_rows(reports)) == 1, 60, "the sent image's row")
        wait_for(
            lambda: d.log_text().count("not a DICOM association request") >= 200, 60, "200 lines"
        )
        d.signal(signal.SIGTERM)  # the ten half-open connections are still open
        asked = time.monotonic()
        assert d.wait(60) == 0
        print(f"SIGTERM to exit, 10 half-open connections held: {time.monotonic() - asked:.1f} s")
    finally:
        for s in held + garbage:
            s.close()
    events = _messages(d)
    dropped = [e for e in events if "not a DICOM association request" in e["message"]]
    assert len(dropped) == 200  # one concise line per garbage connection
    assert not [e for e in events if e["level"] in ("error", "critical")], events
    assert "Traceback" not in d.log_text()


def storescu_with_timeout(
    dcmtk: dict[str, str], port: int, files: list[Path], timeout: float
) -> subprocess.CompletedProcess[str]:
    cmd = [dcmtk["storescu"], "-aet", "MODALITY", "-aec", "XRWATCH", LOOPBACK, str(port)]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=timeout)


def _vm_mib(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def test_a_data_set_over_the_limit_is_refused_while_it_streams_in(
    folders, daemons, dcmtk, tmp_path
) -> None:
    incoming, reports = folders
    port = free_port()
    d = daemons(incoming, reports, *_args(port, "--max-file-mb", "32")).start()
    assert d.proc is not None
    idle = _vm_mib(d.proc.pid, "VmRSS")
    small = _pdf(tmp_path / "small.dcm", 24 * 1024 * 1024)  # under the limit: kept in bounds
    big = _pdf(tmp_path / "big.dcm", 100 * 1024 * 1024)
    cmd = [dcmtk["storescu"], "-aet", "MODALITY", "-aec", "XRWATCH", LOOPBACK, str(port)]
    parallel = [  # four associations at once, each streaming 24 MiB
        subprocess.Popen([*cmd, str(small)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(4)
    ]
    assert [p.wait(300) for p in parallel] == [0, 0, 0, 0]
    refused = storescu(dcmtk, port, [big])
    assert refused[0].returncode != 0  # aborted mid-stream: the sender knows
    rss = _vm_mib(d.proc.pid)
    wait_for(lambda: "data set over max_file_mb" in d.log_text(), 60, "the refusal line")
    assert d.stop() == 0
    print(f"daemon RSS: {idle:.0f} MiB ready, peak {rss:.0f} MiB (4 x 24 MiB, 100 MiB refused)")
    assert rss < 500, rss
    assert not [p for p in incoming.rglob("*") if p.is_file()], "nothing kept or left behind"
    assert sop_uid(small) in d.log_text()  # acknowledged as a non-radiograph
    assert not [e for e in _messages(d) if e["level"] in ("error", "critical")]  # no noise
    assert os.listdir(incoming / "dicom") == [".parts"]  # the parts' folder, empty
    assert os.listdir(incoming / "dicom" / ".parts") == []
