"""The receiver inside ``xrwatch serve``, with DCMTK's storescu/echoscu as the modality:
access control, exactly one result per SOP Instance UID (re-sent instances, kill -9),
SRs in REPORTS/dicom, non-radiographs refused or reported by config."""

from __future__ import annotations

import subprocess
import urllib.request
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from dicom_tools import echoscu, free_port, sop_uid, storescu, storescu_groups
from pydicom.data import get_testdata_file
from serve_harness import assert_csv_intact, csv_rows, wait_for

from tests.helpers.dicom_factory import DEFAULT_PATIENT_NAME, gradient, write_dicom

pytestmark = pytest.mark.slow


def _receiver_args(port: int, *extra: str) -> tuple[str, ...]:
    return (
        "--dicom-port", str(port), "--dicom-host", "127.0.0.1",
        "--dicom-allow-ae", "MODALITY", "--dicom-allow-ae", "PACS", *extra,
    )  # fmt: skip


def _synthetic(folder: Path, n: int, seed: int = 0) -> list[Path]:
    study = pydicom.uid.generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_dicom(
            folder / f"s{i:03d}.dcm",
            pixels=gradient(40 + (i + seed) % 7, 36),
            study_instance_uid=study,
        )
        for i in range(n)
    ]


def test_storescu_to_serve_gives_one_result_per_instance_and_an_sr(
    folders, daemons, dcmtk, real_dicoms, tmp_path
) -> None:
    incoming, reports = folders
    port = free_port()
    d = daemons(incoming, reports, *_receiver_args(port)).start()
    assert echoscu(dcmtk, port, "MODALITY") == 0  # C-ECHO from an allowed caller
    assert echoscu(dcmtk, port, "INTRUDER") != 0  # an unknown calling AE is refused
    secret = _synthetic(tmp_path / "synthetic", 2)  # carry DEFAULT_PATIENT_NAME
    files = [*real_dicoms, *secret]
    sops = {sop_uid(f): f for f in files}
    assert all(r.returncode == 0 for r in storescu(dcmtk, port, files)), "storescu failed"
    wait_for(lambda: len(csv_rows(reports)) >= len(files), 120, "one row per instance")
    # Send everything again, as a modality retrying would: acknowledged, not re-processed.
    assert all(r.returncode == 0 for r in storescu(dcmtk, port, files))
    wait_for(lambda: d.log_text().count("was received before") >= len(files), 60, "duplicates")
    sr_files = wait_for(
        lambda: (s := sorted((reports / "dicom").rglob("*.SR.dcm"))) and len(s) == len(files) and s,
        60,
        "one SR per instance",
    )
    assert d.stop() == 0
    rows = assert_csv_intact(reports)
    assert Counter(r["sop_instance_uid"] for r in rows) == Counter(set(sops))
    assert {r["status"] for r in rows} == {"ok"}
    for row in rows:  # spooled under UIDs only
        spool, study, _series, name = row["file"].split("/")
        assert (spool, study, name) == (
            "dicom",
            row["study_instance_uid"],
            row["sop_instance_uid"] + ".dcm",
        )
    log = d.log_text()
    assert "refused DICOM association from AE 'INTRUDER'" in log
    assert DEFAULT_PATIENT_NAME not in log and "Secret" not in log  # no PHI in the logs

    # One SR per instance, in its source's study (the SR's content: test_dicom_results.py)
    studies = {str(pydicom.dcmread(f, force=True).StudyInstanceUID) for f in files}
    for path in sr_files:
        sr = pydicom.dcmread(path)
        assert sr.Modality == "SR" and sr.StudyInstanceUID in studies
        assert sr.SOPInstanceUID not in sops
        dump = subprocess.run([dcmtk["dsrdump"], str(path)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr


def test_kill_9_mid_receive_then_resend_gives_exactly_one_result(
    folders, daemons, dcmtk, tmp_path
) -> None:
    incoming, reports = folders
    port = free_port()
    files = _synthetic(tmp_path / "synthetic", 24)
    sops = {sop_uid(f) for f in files}
    d = daemons(incoming, reports, *_receiver_args(port)).start()
    ((option, group),) = storescu_groups(files)
    sender = subprocess.Popen(
        [dcmtk["storescu"], option, "-aet", "MODALITY", "-aec", "XRWATCH", "127.0.0.1",
         str(port), *map(str, group)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for(lambda: d.log_text().count("received dicom/") >= 6, 60, "some instances received")
    d.kill9()  # mid-association: some acknowledged, one maybe half written, the rest not sent
    sender.wait(60)
    acknowledged = d.log_text().count("received dicom/")
    d2 = daemons(incoming, reports, *_receiver_args(port)).start()
    # the modality sends again whatever it is unsure of (here: everything)
    assert all(r.returncode == 0 for r in storescu(dcmtk, port, files))
    wait_for(lambda: len(csv_rows(reports)) >= len(files), 120, "every instance reported")
    assert d2.stop() == 0
    rows = assert_csv_intact(reports)
    assert Counter(r["sop_instance_uid"] for r in rows) == Counter(sops)
    assert d2.log_text().count("was received before") >= acknowledged
    assert not list(incoming.rglob(".*.part")), "a partly received file was left behind"


def test_non_radiographs_are_acknowledged_and_dropped_or_reported_as_errors_by_config(
    folders, daemons, dcmtk, tmp_path
) -> None:
    incoming, reports = folders
    ct = Path(get_testdata_file("CT_small.dcm"))
    dx = _synthetic(tmp_path / "dx", 1)
    port, metrics = free_port(), free_port()
    d = daemons(incoming, reports, *_receiver_args(port), "--metrics-port", str(metrics))
    d.start()
    # a routed study carries CT, SR, PDF ...: acknowledged (the route goes on), not kept
    assert all(r.returncode == 0 for r in storescu(dcmtk, port, [ct, *dx]))
    wait_for(lambda: len(csv_rows(reports)) >= 1, 60, "the DX row")
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read()
    assert b'xrwatch_dicom_ignored_total{sop_class="CT Image Storage"} 1.0' in body
    assert d.stop() == 0
    assert not list((incoming / "dicom").rglob(sop_uid(ct) + ".dcm"))
    assert d.log_text().count("is not a radiograph; acknowledged, not kept") == 1
    assert len(csv_rows(reports)) == 1

    port = free_port()
    d = daemons(incoming, reports, *_receiver_args(port, "--dicom-accept-other")).start()
    assert all(r.returncode == 0 for r in storescu(dcmtk, port, [ct]))
    wait_for(lambda: len(csv_rows(reports)) >= 2, 60, "the CT row")
    assert d.stop() == 0
    ct_sop = sop_uid(ct)
    (row,) = [r for r in csv_rows(reports) if r["file"].endswith(f"/{ct_sop}.dcm")]
    assert row["status"] == "error" and "CT" in row["error"]
    assert len(list((reports / "dicom").rglob("*.SR.dcm"))) == 1  # the DX's; none for an error


def test_once_with_dicom_sr_writes_the_srs_of_dropped_dicoms_before_exiting(
    folders, tiny_onnx_model, real_dicoms
) -> None:
    from serve_harness import run_once

    incoming, reports = folders
    for f in real_dicoms[:2]:
        (incoming / f.name).write_bytes(f.read_bytes())
    done = run_once(incoming, reports, tiny_onnx_model, "--dicom-sr")
    assert done.returncode == 0, done.stdout + done.stderr
    log = done.stdout + done.stderr  # a clean stop logs no error (the node's close)
    assert "ERROR" not in log and '"level": "error"' not in log, log
    assert "Traceback" not in log, log
    srs = sorted((reports / "dicom").rglob("*.SR.dcm"))
    assert sorted(p.name for p in srs) == sorted(f"{sop_uid(f)}.SR.dcm" for f in real_dicoms[:2])


def test_with_archive_a_resent_instance_is_not_reprocessed_and_each_gets_one_sr(
    folders, daemons, dcmtk, tmp_path
) -> None:
    incoming, reports = folders
    archive = tmp_path / "archive"
    port = free_port()
    files = _synthetic(tmp_path / "synthetic", 3)
    d = daemons(incoming, reports, *_receiver_args(port), "--archive", str(archive)).start()
    assert all(r.returncode == 0 for r in storescu(dcmtk, port, files))
    wait_for(lambda: len(list(archive.rglob("*.dcm"))) == len(files), 60, "archived inputs")
    assert all(r.returncode == 0 for r in storescu(dcmtk, port, files))  # sent again
    wait_for(lambda: d.log_text().count("was received before") >= len(files), 60, "dups")
    wait_for(lambda: len(list((reports / "dicom").rglob("*.SR.dcm"))) == len(files), 60, "SRs")
    assert d.stop() == 0
    assert len(csv_rows(reports)) == len(files)
    assert not list((incoming / "dicom").rglob("*.dcm"))  # moved, and not written again
