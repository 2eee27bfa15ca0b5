"""A real ``xrwatch serve`` whose PACS cannot be reached is degraded, not down: /healthz
answers 200 and names the destination; /metrics has the outbox's pending and parked
gauges; once the PACS answers, /healthz is plain ``ok`` again."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from serve_harness import wait_for

from tests.helpers.net import LOOPBACK, free_port

pytestmark = pytest.mark.slow


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _gauge(text: str, name: str, dest: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f'{name}{{destination="{dest}"}}'):
            return float(line.split()[-1])
    return None


def test_an_unreachable_pacs_degrades_healthz_without_failing_it(
    folders, daemons, real_dicoms: list[Path]
) -> None:
    incoming, reports = folders
    pacs_port, metrics_port = free_port(), free_port()
    dest = f"PACS@{LOOPBACK}:{pacs_port}"
    chest = pydicom.dcmread(real_dicoms[0], force=True)
    chest.save_as(incoming / "a.dcm", enforce_file_format=False)
    d = daemons(incoming, reports, "--dicom-destination", dest, "--no-heatmaps",
                "--metrics-port", str(metrics_port),
                "--dicom-send-retry", "0.5").start()  # fmt: skip
    server = None
    try:
        wait_for(lambda: dest in _get(metrics_port, "/healthz")[1], 120, "/healthz names it")
        code, text = _get(metrics_port, "/healthz")
        assert code == 200 and text.startswith("ok; DICOM destination " + dest), text
        metrics = _get(metrics_port, "/metrics")[1]
        assert _gauge(metrics, "xrwatch_dicom_outbox_pending", dest) == 1.0
        assert _gauge(metrics, "xrwatch_dicom_outbox_parked", dest) == 0.0  # down: no park
        ae = AE("PACS")  # the PACS comes up
        ae.add_supported_context(Verification)
        ae.add_supported_context(Comprehensive3DSRStorage)
        server = ae.start_server((LOOPBACK, pacs_port), block=False)
        wait_for(lambda: _get(metrics_port, "/healthz") == (200, "ok\n"), 120, "plain ok")
    finally:
        assert d.stop() == 0
        if server is not None:
            server.shutdown()
