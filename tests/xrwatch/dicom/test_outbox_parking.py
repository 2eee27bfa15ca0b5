"""The outbox's dead letters: attempts counted per item, parked after the limit, shown,
requeued; a ledger from before parking is migrated with its rows kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from xrwatch.dicom.outbox import Outbox

OLD_OUTBOX = """
CREATE TABLE dicom_outbox (
    id              INTEGER PRIMARY KEY,
    file_id         INTEGER NOT NULL,
    sr_sop_uid      TEXT NOT NULL,
    sr_path         TEXT NOT NULL,
    destination     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'sent')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    owner           TEXT,
    leased_until    REAL NOT NULL DEFAULT 0,
    last_error      TEXT,
    sent_at         REAL,
    UNIQUE (sr_sop_uid, destination)
);
INSERT INTO dicom_outbox (file_id, sr_sop_uid, sr_path, destination, state, attempts, sent_at)
VALUES (1, '1.2.1', 'dicom/1/a.SR.dcm', 'PACS@h:104', 'sent', 1, 1.0),
       (2, '1.2.2', 'dicom/1/b.SR.dcm', 'PACS@h:104', 'pending', 0, NULL);
"""


def test_a_ledger_from_before_parking_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite3"
    con = sqlite3.connect(db)
    con.executescript(OLD_OUTBOX)
    con.close()
    outbox = Outbox(db)
    outbox.create()
    outbox.create()  # twice: the migration happens once
    assert outbox.destination_counts()["PACS@h:104"] == {
        "sent": 1, "pending": 1, "parked": 0, "failed_attempts": 0, "last_error": None,
    }  # fmt: skip
    (due,) = outbox.take_sends("PACS@h:104")
    assert outbox.send_failed(due.id, 1, "refused with status 0xA700", max_attempts=1)[0] == (
        "parked"
    )
    assert outbox.destination_counts()["PACS@h:104"]["parked"] == 1
    outbox.close()


def test_sends_are_parked_after_the_limit_then_shown_and_requeued(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "ledger.sqlite3")
    outbox.create()
    con = outbox._con()
    con.execute(
        "INSERT INTO dicom_outbox (file_id, sr_sop_uid, sr_path, destination, state) "
        "VALUES (1, '1.2.9', 'dicom/1/x.SC.dcm', 'PACS@h:104', 'pending')"
    )
    states = []
    for attempt in range(1, 4):
        con.execute("UPDATE dicom_outbox SET next_attempt_at=0")  # due now
        (due,) = outbox.take_sends("PACS@h:104")
        assert due.attempts == attempt - 1
        states.append(outbox.send_failed(due.id, attempt, "no answer", max_attempts=3)[0])
    assert states == ["pending", "pending", "parked"]
    con.execute("UPDATE dicom_outbox SET next_attempt_at=0")
    assert outbox.take_sends("PACS@h:104") == []  # a parked item is not sent again
    assert outbox.parked() == [{"what": "send", "sop_instance_uid": "1.2.9",
                                "destination": "PACS@h:104", "attempts": 3,
                                "error": "no answer"}]  # fmt: skip
    counts = outbox.destination_counts()["PACS@h:104"]
    assert counts["parked"] == 1 and counts["last_error"] == "no answer"
    assert outbox.requeue_parked("PACS@h:104") == 1
    (due,) = outbox.take_sends("PACS@h:104")
    assert due.attempts == 0 and due.last_error == "no answer"
    outbox.sent(due.id)
    assert outbox.send_failed(due.id, 9, "late", max_attempts=1)[0] == "parked"
    assert outbox.destination_counts()["PACS@h:104"]["sent"] == 1  # a sent row stays sent
    outbox.close()


def test_an_unreachable_destination_defers_without_counting_attempts(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "ledger.sqlite3")
    outbox.create()
    outbox._con().execute(
        "INSERT INTO dicom_outbox (file_id, sr_sop_uid, sr_path, destination, state) "
        "VALUES (1, '1.2.9', 'dicom/1/x.SR.dcm', 'PACS@h:104', 'pending')"
    )
    (due,) = outbox.take_sends("PACS@h:104")
    outbox.defer([due.id], 60.0, "connection refused")
    assert outbox.take_sends("PACS@h:104") == []  # waiting for the destination's back-off
    row = outbox._con().execute("SELECT attempts, state, last_error FROM dicom_outbox").fetchone()
    assert row == (0, "pending", "connection refused")
    outbox.close()
