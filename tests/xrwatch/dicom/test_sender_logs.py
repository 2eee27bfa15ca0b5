"""Issue #21 item 10 against a real ``xrwatch serve``: a PACS that refuses every result no
longer floods the log with one WARNING per pending SR per attempt. Each refused item is
logged once when it first fails (again only if its error changes, or when it is parked or
recovers), and pynetdicom's own per-attempt errors about our associations are dropped.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from serve_harness import wait_for

from tests.helpers.net import LOOPBACK, free_port

pytestmark = pytest.mark.slow
ATTEMPTS = 3  # each refused item is tried at least this often before the log is read


def test_a_refusing_pacs_is_logged_once_per_item_not_per_attempt(
    folders, daemons, real_dicoms: list[Path]
) -> None:
    incoming, reports = folders
    tried: Counter[str] = Counter()

    def refuse(event: evt.Event) -> int:
        tried[str(event.request.AffectedSOPInstanceUID)] += 1
        return 0xA700  # Out of Resources: a refusal, item by item

    ae = AE("PACS")
    ae.add_supported_context(Verification)
    ae.add_supported_context(Comprehensive3DSRStorage)
    port = free_port()
    server = ae.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)]
    )
    n = 4
    chest = pydicom.dcmread(real_dicoms[0], force=True)  # CR-MONO1-10-chest
    for i in range(n):
        chest.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.9.{i + 1}"
        chest.save_as(incoming / f"{i}.dcm", enforce_file_format=False)
    d = daemons(incoming, reports, "--dicom-destination", f"PACS@{LOOPBACK}:{port}",
                "--no-heatmaps", "--dicom-send-retry", "0.3").start()  # fmt: skip
    try:
        wait_for(lambda: len(tried) == n and min(tried.values()) >= ATTEMPTS, 120,
                 f"each SR refused {ATTEMPTS} times")  # fmt: skip
    finally:
        assert d.stop() == 0
        server.shutdown()
    events = d.log_events()
    loud = [e for e in events if e["level"] in ("warning", "error", "critical")]
    refused = [e for e in loud if "not sent to" in e["message"]]
    assert len(refused) == n  # one line per item, not per attempt (>= 3 each here)
    assert all("0xA700" in e["message"] for e in refused)
    assert not [e for e in loud if e.get("logger", "").startswith("pynetdicom")]
    assert sum(tried.values()) >= ATTEMPTS * n
