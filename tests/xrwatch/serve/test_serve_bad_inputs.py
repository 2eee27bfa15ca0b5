"""Every kind of bad input gets one ``status: error`` row with a reason a person
understands, and the daemon carries on. No patient name reaches reports or logs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from serve_harness import assert_csv_intact, csv_rows, make_png, png_bytes, wait_for

from tests.helpers.dicom_factory import (
    DEFAULT_BIRTH_DATE,
    DEFAULT_PATIENT_ID,
    gradient,
    truncate,
    write_dicom,
)

SECRET_NAME = "Geheim^Johanna^Maria"


def test_every_bad_input_is_reported_and_the_daemon_carries_on(
    folders, daemons, tmp_path: Path
) -> None:
    incoming, reports = folders
    outside = tmp_path / "outside.png"
    make_png(outside, seed=1)
    d = daemons(incoming, reports, "--truncated-timeout", "1.5").start()

    (incoming / "notes.png").write_text("this is a text file, not an X-ray\n")
    (incoming / "empty.dcm").write_bytes(b"")
    truncated_png = png_bytes(seed=2, size=64)
    (incoming / "truncated.png").write_bytes(truncated_png[: len(truncated_png) // 2])
    write_dicom(incoming / "corrupt.dcm", pixels=gradient(32, 32))
    data = bytearray((incoming / "corrupt.dcm").read_bytes())
    data[132:400] = os.urandom(268)  # header garbage after the DICM marker
    (incoming / "corrupt.dcm").write_bytes(bytes(data))
    write_dicom(incoming / "ct.dcm", pixels=gradient(32, 32), modality="CT")
    write_dicom(incoming / "truncated.dcm", pixels=gradient(64, 64))
    truncate(incoming / "truncated.dcm", drop=2000)
    (incoming / "outside_link.png").symlink_to(outside)
    (incoming / "dangling.png").symlink_to(incoming / "no-such-file.png")
    os.mkfifo(incoming / "pipe.dcm")  # cannot be read as a file, even by root
    unreadable = incoming / "unreadable.png"
    make_png(unreadable, seed=3)
    unreadable.chmod(0)
    make_png(incoming / "good.png", seed=4)

    expected_errors = {
        "notes.png": "not a DICOM, PNG or JPEG",
        "empty.dcm": "empty file",
        "truncated.png": "truncated",
        "corrupt.dcm": "",
        "ct.dcm": "not a projection radiograph",
        "truncated.dcm": "",
        "outside_link.png": "points outside INCOMING",
        "dangling.png": "does not exist",
        "pipe.dcm": "named pipe",
    }
    root = os.geteuid() == 0  # root reads a chmod 000 file: it is then simply processed
    if not root:
        expected_errors["unreadable.png"] = "permission denied"
    n_expected = len(expected_errors) + 1 + int(root)
    wait_for(lambda: len(csv_rows(reports)) >= n_expected, 90, f"{n_expected} rows")
    time.sleep(0.5)
    # still alive and working after all that
    make_png(incoming / "after.png", seed=5)
    wait_for(lambda: len(csv_rows(reports)) >= n_expected + 1, 60, "a row after the bad ones")
    assert d.stop() == 0

    rows = {r["file"]: r for r in assert_csv_intact(reports)}
    assert len(rows) == n_expected + 1, sorted(rows)
    for name, words in expected_errors.items():
        row = rows[name]
        assert row["status"] == "error", row
        assert row["error"], f"{name}: no reason given"
        assert words.lower() in row["error"].lower(), (name, row["error"])
        assert row["label"] == "" and row["confidence"] == ""
    assert "still incomplete after" in rows["truncated.png"]["error"]
    for name in ("good.png", "after.png"):
        assert rows[name]["status"] == "ok"
    # the link target outside INCOMING was never read
    assert rows["outside_link.png"]["sha256"] == ""
    assert outside.exists() and (incoming / "outside_link.png").is_symlink()


def test_no_patient_name_id_or_birth_date_in_reports_or_logs(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports, "--truncated-timeout", "1").start()
    write_dicom(
        incoming / "patient.dcm",
        pixels=gradient(48, 40),
        patient_name=SECRET_NAME,
        accession_number="ACC-42",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.2",
    )
    write_dicom(incoming / "patient_ct.dcm", pixels=gradient(16, 16), modality="CT",
                patient_name=SECRET_NAME)  # fmt: skip
    bad = incoming / "patient_trunc.dcm"
    write_dicom(bad, pixels=gradient(64, 64), patient_name=SECRET_NAME)
    truncate(bad, drop=3000)
    wait_for(lambda: len(csv_rows(reports)) == 3, 60, "three rows")
    assert d.stop() == 0

    rows = {r["file"]: r for r in csv_rows(reports)}
    ok = rows["patient.dcm"]
    assert ok["status"] == "ok"
    assert ok["accession_number"] == "ACC-42"
    assert ok["study_instance_uid"] == "1.2.826.0.1.3680043.8.498.1"
    assert ok["sop_instance_uid"] == "1.2.826.0.1.3680043.8.498.2"
    assert rows["patient_ct.dcm"]["status"] == "error"

    secrets = [
        SECRET_NAME,
        "Geheim",
        "Johanna",
        DEFAULT_PATIENT_ID,
        DEFAULT_BIRTH_DATE,
    ]
    outputs = [p for p in reports.rglob("*") if p.is_file()] + [d.log]
    assert len(outputs) >= 5
    for path in outputs:
        blob = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in blob, f"{secret!r} found in {path}"
    # and every log line is one JSON object
    assert all(isinstance(e, dict) for e in d.log_events())


@pytest.mark.skipif(os.geteuid() != 0, reason="checks what root sees of a chmod 000 file")
def test_root_reads_chmod_000_files(folders, daemons) -> None:
    """Documented behaviour: as root, permission bits do not stop reading, so a chmod 000
    image is classified; as any other user it is a 'permission denied' error row (see the
    test above). A FIFO stands in for a file nobody can read."""
    incoming, reports = folders
    p = make_png(incoming / "locked.png", seed=9)
    p.chmod(0)
    d = daemons(incoming, reports).start()
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "one row")
    assert d.stop() == 0
    assert csv_rows(reports)[0]["status"] == "ok"


def test_json_report_matches_csv_row(folders, daemons) -> None:
    incoming, reports = folders
    make_png(incoming / "sub" / "a.png", seed=1)
    (incoming / "sub" / "b.png").write_text("nope")
    d = daemons(incoming, reports).start()
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "two rows")
    assert d.stop() == 0
    for row in csv_rows(reports):
        rec = json.loads((reports / "json" / (row["file"] + ".json")).read_text())
        for key in ("file", "sha256", "status", "label", "error", "model", "model_sha256",
                    "provider"):  # fmt: skip
            assert (rec[key] or "") == row[key], key
        assert row["model"].startswith("tinycnn-custom-fp32 (")  # every row names its model
        if row["status"] == "ok":
            probs = rec["probabilities"]
            assert set(probs) == {c[5:] for c in row if c.startswith("prob_")}
            assert abs(sum(probs.values()) - 1.0) < 1e-4
            assert max(probs, key=probs.__getitem__) == row["label"]
            assert abs(float(row["confidence"]) - max(probs.values())) < 1e-5
    assert not list((reports / "json").rglob(".*.tmp"))  # no temp files left behind
