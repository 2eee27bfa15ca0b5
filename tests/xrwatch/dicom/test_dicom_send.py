"""Results sent back as DICOM to a real Orthanc: in the right study, referencing the right
instance, exactly once per source instance across a kill -9 between the PACS's
acknowledgement and the ledger's record; counters in /metrics and ``xrwatch status``."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections import Counter

import pytest
from dicom_tools import free_port, sop_uid, storescu
from serve_harness import ROOT, csv_rows, wait_for

from xrwatch.cli._app import main

pytestmark = pytest.mark.slow


def _status(state_dir) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "xrwatch", "status", "--state-dir", str(state_dir), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode in (0, 1, 3), out.stderr  # LSB: running, dead, not running
    return json.loads(out.stdout)


def test_srs_reach_orthanc_exactly_once_across_kill_9_mid_send(
    folders, daemons, dcmtk, orthanc, real_dicoms
) -> None:
    incoming, reports = folders
    sources = {sop_uid(f): f for f in real_dicoms}
    assert main(["dicom-echo", orthanc.destination]) == 0  # the installer's check
    # The PACS already holds the images (the modality sent them there too).
    assert all(r.returncode == 0 for r in storescu(dcmtk, orthanc.dicom_port, real_dicoms))
    port, metrics_port = free_port(), free_port()
    args = (
        "--dicom-port", str(port), "--dicom-host", "127.0.0.1", "--dicom-allow-ae", "MODALITY",
        "--dicom-destination", orthanc.destination,
        "--no-heatmaps",  # one send per source: the SR (with heatmaps an SC follows it)
    )  # fmt: skip
    # First run dies right after Orthanc acknowledged the first SR, before the ledger
    # recorded it: the worst moment for "never sent twice".
    d = daemons(incoming, reports, *args).start(env={"XRWATCH_DICOM_FAULT": "kill-after-send"})
    storescu(dcmtk, port, real_dicoms)  # the later sends may fail: the daemon dies meanwhile
    assert d.wait(120) == -9
    in_pacs = orthanc.get("/statistics")["CountInstances"]
    assert in_pacs > len(sources)  # SRs acknowledged by Orthanc, never recorded as sent
    d2 = daemons(incoming, reports, *args, "--metrics-port", str(metrics_port)).start()
    # The modality sends again what was not acknowledged (here simply everything).
    assert all(r.returncode == 0 for r in storescu(dcmtk, port, real_dicoms))

    def srs() -> list[dict]:
        return [t for t in orthanc.instances_tags() if t.get("Modality") == "SR"]

    wait_for(lambda: len(srs()) >= len(sources) and len(csv_rows(reports)) >= len(sources),
             120, "an SR in Orthanc per source")  # fmt: skip
    wait_for(lambda: _status(d2.state_dir)["dicom"]["destinations"][orthanc.destination]
             ["pending"] == 0, 60, "the outbox drained")  # fmt: skip
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert d2.stop() == 0

    found = srs()
    images = {t["SOPInstanceUID"]: t for t in orthanc.instances_tags() if t.get("Modality") != "SR"}
    referenced = []
    for sr in found:
        evidence = sr["CurrentRequestedProcedureEvidenceSequence"][0]
        ref = evidence["ReferencedSeriesSequence"][0]["ReferencedSOPSequence"][0]
        source_uid = ref["ReferencedSOPInstanceUID"]
        referenced.append(source_uid)
        assert sr["_study"] == images[source_uid]["_study"]  # same study in the PACS
        assert sr["StudyInstanceUID"] == images[source_uid]["StudyInstanceUID"]
    assert Counter(referenced) == Counter(set(sources))  # exactly one SR per source instance
    status = _status(d2.state_dir)["dicom"]
    assert status["destinations"][orthanc.destination]["sent"] == len(sources)
    assert status["results"]["written"] == len(sources)
    line = f'xrwatch_dicom_sent_total{{destination="{orthanc.destination}"}}'
    assert line in metrics
    sent_after_restart = float(metrics.split(line)[1].split()[0])
    assert sent_after_restart == len(sources)  # the unrecorded one went again, same UID


def test_unreachable_destination_is_retried_with_back_off_across_a_restart(
    folders, daemons, dcmtk, orthanc_factory, real_dicoms
) -> None:
    incoming, reports = folders
    files = real_dicoms[:2]
    port, pacs_port = free_port(), free_port()
    dest = f"ORTHANC@127.0.0.1:{pacs_port}"
    args = (
        "--dicom-port", str(port), "--dicom-host", "127.0.0.1", "--dicom-allow-ae", "MODALITY",
        "--dicom-destination", dest, "--no-heatmaps",  # SRs only: one send per source
        "--dicom-send-retry", "0.5",  # back-off 0.5, 1, 2 ... s: the second daemon soon tries
    )  # fmt: skip
    d = daemons(incoming, reports, *args).start()  # the PACS is down
    assert all(r.returncode == 0 for r in storescu(dcmtk, port, files))
    wait_for(lambda: f"{dest}: cannot send results" in d.log_text(), 60, "the failure")

    # the first result can fail before the second image is classified: wait for both
    def pending() -> int | None:
        return _status(d.state_dir)["dicom"]["destinations"].get(dest, {}).get("pending")

    wait_for(lambda: pending() == len(files), 60, "both results waiting for the PACS")
    assert d.stop() == 0
    counts = _status(d.state_dir)["dicom"]["destinations"][dest]
    assert counts["sent"] == 0 and counts["pending"] == len(files)
    assert counts["parked"] == 0 and counts["last_error"]  # down: waits, is never parked
    assert d.log_text().count(f"{dest}: cannot send results") == 1  # logged once, not per try
    text = subprocess.run(
        [sys.executable, "-m", "xrwatch", "status", "--state-dir", str(d.state_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert f"to {dest}: 0 sent, {len(files)} pending" in text

    pacs = orthanc_factory(dicom_port=pacs_port)  # the PACS is back
    d2 = daemons(incoming, reports, *args).start()
    wait_for(lambda: pacs.get("/statistics")["CountInstances"] >= len(files), 60, "the SRs")
    wait_for(lambda: _status(d2.state_dir)["dicom"]["destinations"][dest]["sent"] == len(files),
             30, "recorded as sent")  # fmt: skip
    assert d2.stop() == 0
    referenced = sorted(
        t["CurrentRequestedProcedureEvidenceSequence"][0]["ReferencedSeriesSequence"][0][
            "ReferencedSOPSequence"
        ][0]["ReferencedSOPInstanceUID"]
        for t in pacs.instances_tags()
    )
    assert referenced == sorted(sop_uid(f) for f in files)
