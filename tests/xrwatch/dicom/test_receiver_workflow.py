"""The receiver as a PACS and a modality meet it (issue #21 item 5, issue #23): a known SOP
Instance UID with other content, a truncated instance, a whole study routed back with
xrwatch's own output in it, called-AE and address refusals that say why, DICOM TLS."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest
from dicom_tools import LOOPBACK, echoscu, free_port, sop_uid, storescu
from pydicom.data import get_testdata_file
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from serve_harness import csv_rows, wait_for

from tests.helpers.dicom_factory import gradient, write_dicom
from xrwatch.dicom.uids import UID_ROOT

pytestmark = pytest.mark.slow


def _args(port: int, *extra: str) -> tuple[str, ...]:
    return (
        "--dicom-port", str(port), "--dicom-host", LOOPBACK, "--dicom-allow-ae", "MODALITY",
        *extra,
    )  # fmt: skip


def test_a_known_uid_with_other_content_is_refused_and_a_resend_acknowledged(
    folders, daemons, dcmtk, tmp_path
) -> None:
    incoming, reports = folders
    port = free_port()
    sop, study = generate_uid(), generate_uid()
    first = write_dicom(
        tmp_path / "a.dcm", pixels=gradient(40, 36), sop_instance_uid=sop, study_instance_uid=study
    )
    other = write_dicom(  # the same UIDs, other pixels and another patient
        tmp_path / "b.dcm",
        pixels=gradient(44, 36),
        sop_instance_uid=sop,
        study_instance_uid=study,
        patient_id="OTHER-PATIENT",
    )
    d = daemons(incoming, reports, *_args(port)).start()
    assert storescu(dcmtk, port, [first])[0].returncode == 0
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "the first row")
    assert storescu(dcmtk, port, [first])[0].returncode == 0  # a retry: acknowledged
    refused = storescu(dcmtk, port, [other])[0]
    assert refused.returncode != 0  # the sender sees the failure (0111), never a silent drop
    wait_for(lambda: "received before with other content" in d.log_text(), 60, "the refusal")
    assert d.stop() == 0
    log = d.log_text()
    assert log.count("was received before; acknowledged") == 1
    assert "OTHER-PATIENT" not in log
    (row,) = csv_rows(reports)
    assert row["sop_instance_uid"] == sop
    kept = list((incoming / "dicom").rglob(f"{sop}.dcm"))
    assert len(kept) == 1 and kept[0].read_bytes()[-100:] == first.read_bytes()[-100:]


def test_a_truncated_instance_fails_at_once(folders, daemons, dcmtk, tmp_path) -> None:
    incoming, reports = folders
    port = free_port()
    ds_path = write_dicom(tmp_path / "cut.dcm", pixels=gradient(64, 64))
    ds = pydicom.dcmread(ds_path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # half the pixels the header promises
    ds.save_as(ds_path, enforce_file_format=True)
    d = daemons(incoming, reports, *_args(port)).start()
    failed = storescu(dcmtk, port, [ds_path])[0]
    assert failed.returncode != 0  # status C000 at once, not 0000 and a 300 s wait
    assert d.stop() == 0
    assert "truncated: pixel data is" in d.log_text()
    assert not list((incoming / "dicom").rglob("*.dcm"))
    assert csv_rows(reports) == []


def test_a_routed_study_with_our_own_output_classifies_only_the_radiographs(
    folders, daemons, dcmtk, tmp_path
) -> None:
    incoming, reports = folders
    port, metrics = free_port(), free_port()
    study = generate_uid()
    cr = [
        write_dicom(tmp_path / f"cr{i}.dcm", pixels=gradient(40 + i, 36), study_instance_uid=study)
        for i in range(2)
    ]
    ours = write_dicom(  # the heatmap SC xrwatch sent, routed back by the PACS
        tmp_path / "ours.dcm",
        pixels=gradient(48, 36),
        study_instance_uid=study,
        sop_class_uid=SecondaryCaptureImageStorage,
        sop_instance_uid=f"{UID_ROOT}.4.12345",
        extra={"Manufacturer": "xrwatch"},
    )
    versions = write_dicom(  # marked by its software versions alone
        tmp_path / "ours2.dcm",
        pixels=gradient(50, 36),
        study_instance_uid=study,
        extra={"SoftwareVersions": "xrwatch 0.1.0"},
    )
    sr = Path(get_testdata_file("test-SR.dcm"))  # someone else's SR: not a radiograph
    d = daemons(incoming, reports, *_args(port), "--metrics-port", str(metrics)).start()
    assert all(r.returncode == 0 for r in storescu(dcmtk, port, [*cr, ours, versions, sr]))
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "the two CR rows")
    body = urllib.request.urlopen(f"http://{LOOPBACK}:{metrics}/metrics", timeout=10).read()
    assert b"xrwatch_dicom_own_output_total 2.0" in body
    assert b'xrwatch_dicom_ignored_total{sop_class="Comprehensive SR Storage"} 1.0' in body
    assert d.stop() == 0
    assert sorted(r["sop_instance_uid"] for r in csv_rows(reports)) == sorted(map(sop_uid, cr))
    log = d.log_text()
    assert log.count("was made by xrwatch") == 2
    assert "is not a radiograph; acknowledged, not kept" in log


def test_refusals_say_why_and_associations_are_logged_with_the_peer(
    folders, daemons, dcmtk, tmp_path
) -> None:
    incoming, reports = folders
    port = free_port()
    d = daemons(incoming, reports, *_args(port)).start()
    assert echoscu(dcmtk, port, "MODALITY") == 0
    wrong = subprocess.run(
        [dcmtk["echoscu"], "-aet", "MODALITY", "-aec", "NOT_US", LOOPBACK, str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
    assert d.stop() == 0
    log = d.log_text()
    assert "called AE title is not ours ('XRWATCH')" in log
    assert "DICOM association from AE 'MODALITY' at 127.0.0.1:" in log  # accepted, with port

    port = free_port()
    d = daemons(incoming, reports, *_args(port, "--dicom-allow-host", "10.0.0.0/8")).start()
    by_address = subprocess.run(
        [dcmtk["echoscu"], "-aet", "MODALITY", "-aec", "XRWATCH", LOOPBACK, str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert by_address.returncode != 0
    said = by_address.stdout + by_address.stderr
    assert "Reason: No Reason" in said and "Calling AE Title Not Recognized" not in said
    assert d.stop() == 0
    assert "source address not in dicom_allow_hosts" in d.log_text()


def test_dicom_tls_with_storescu(folders, daemons, dcmtk, tmp_path) -> None:
    incoming, reports = folders
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    port = free_port()
    tls = ("--dicom-tls-cert", str(cert), "--dicom-tls-key", str(key))
    d = daemons(incoming, reports, *_args(port, *tls)).start()
    files = [write_dicom(tmp_path / "dx.dcm", pixels=gradient(40, 36))]
    sent = subprocess.run(
        [dcmtk["storescu"], "+tls", str(key), str(cert), "+cf", str(cert), "-aet", "MODALITY",
         "-aec", "XRWATCH", LOOPBACK, str(port), str(files[0])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "the row of the image sent over TLS")
    assert storescu(dcmtk, port, files)[0].returncode != 0  # plain DICOM to a TLS port
    wait_for(lambda: "TLS handshake failed" in d.log_text(), 60, "the plain connection's line")
    assert d.stop() == 0
    assert f"listening on 127.0.0.1:{port} with TLS" in d.log_text()

    # with dicom_tls_ca, a sender needs a certificate signed by it (here: the same one)
    port = free_port()
    d = daemons(incoming, reports, *_args(port, *tls, "--dicom-tls-ca", str(cert))).start()
    with_cert = [dcmtk["storescu"], "+tls", str(key), str(cert), "+cf", str(cert)]
    anonymous = [dcmtk["storescu"], "+tla", "+cf", str(cert)]
    for cmd, ok in ((with_cert, True), (anonymous, False)):
        other = write_dicom(tmp_path / f"dx{ok}.dcm", pixels=gradient(41, 36))
        done = subprocess.run(
            [*cmd, "-aet", "MODALITY", "-aec", "XRWATCH", LOOPBACK, str(port), str(other)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "the row of the certified sender")
    assert d.stop() == 0
    assert "TLS handshake failed" in d.log_text()


def _orthanc(orthanc, method: str, path: str, body: bytes | str | None = None) -> object:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(
        f"http://{LOOPBACK}:{orthanc.http_port}{path}", data=data, method=method
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read() or b"null")


def test_orthanc_pushes_a_whole_study_and_only_its_radiographs_are_classified(
    folders, daemons, orthanc, tmp_path
) -> None:
    incoming, reports = folders
    port = free_port()
    study = generate_uid()
    cr = [
        write_dicom(tmp_path / f"cr{i}.dcm", pixels=gradient(40 + i, 36), study_instance_uid=study)
        for i in range(3)
    ]
    ours = write_dicom(  # the heatmap SC xrwatch sent before, now part of the study
        tmp_path / "ours.dcm",
        pixels=gradient(48, 36),
        study_instance_uid=study,
        sop_class_uid=SecondaryCaptureImageStorage,
        sop_instance_uid=f"{UID_ROOT}.4.777",
        extra={"Manufacturer": "xrwatch"},
    )
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))  # someone else's report
    first = pydicom.dcmread(cr[0], stop_before_pixels=True)
    sr.StudyInstanceUID, sr.PatientID, sr.PatientName = study, first.PatientID, first.PatientName
    sr.save_as(tmp_path / "sr.dcm")
    for path in [*cr, ours, tmp_path / "sr.dcm"]:
        _orthanc(orthanc, "POST", "/instances", path.read_bytes())
    (study_id,) = _orthanc(orthanc, "GET", "/studies")  # type: ignore[misc]
    d = daemons(incoming, reports, *_args(port), "--dicom-allow-ae", "ORTHANC").start()
    peer = json.dumps({"AET": "XRWATCH", "Host": LOOPBACK, "Port": port})
    _orthanc(orthanc, "PUT", "/modalities/xrwatch", peer)
    # the whole study, as a routing rule would push it: every instance accepted
    done = _orthanc(orthanc, "POST", "/modalities/xrwatch/store", json.dumps([study_id]))
    assert isinstance(done, dict), done
    assert (done["InstancesCount"], done["FailedInstancesCount"]) == (5, 0), done
    wait_for(lambda: len(csv_rows(reports)) == 3, 60, "the three CR rows")
    assert d.stop() == 0
    assert sorted(r["sop_instance_uid"] for r in csv_rows(reports)) == sorted(map(sop_uid, cr))
    log = d.log_text()
    assert "was made by xrwatch" in log and "is not a radiograph" in log
