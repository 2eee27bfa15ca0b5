"""The content of every instance the receiver kept, by SOP Instance UID.

A SOP Instance UID names one object. A sender that sends it again with the same bytes
(a retry) is acknowledged without the instance being written or classified again; one
that sends *other* content under a known UID (a corrected image, another patient, a
modality that reuses UIDs) is refused with status 0111 "Duplicate SOP Instance" and a
comment saying why, so it is never acknowledged and silently dropped. The sha256 of the
received file (file meta and data set, as streamed in) is what is compared.

The table lives in the ledger database beside the node's own tables.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS dicom_receipts (
    sop_instance_uid TEXT PRIMARY KEY,
    sha256           TEXT NOT NULL,  -- of the file as received
    path             TEXT NOT NULL,  -- relative to INCOMING
    received_at      REAL NOT NULL
);
"""


class Receipts:
    """One connection, used by the receiver under its lock (any association thread)."""

    def __init__(self, db: Path) -> None:
        self.db = Path(db)
        self._con: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            con = sqlite3.connect(
                self.db, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            con.execute("PRAGMA journal_mode=WAL")
            # NORMAL: the receiver then records the instance in dicom_received (outbox,
            # synchronous=FULL) before it acknowledges; that commit syncs the shared WAL,
            # this row's frames with it, so one fsync serves both
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA busy_timeout=30000")
            con.executescript(SCHEMA)
            self._con = con
        return self._con

    def sha256(self, sop_uid: str) -> str | None:
        row = (
            self._connection()
            .execute("SELECT sha256 FROM dicom_receipts WHERE sop_instance_uid=?", (sop_uid,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    def record(self, sop_uid: str, sha256: str, path: str) -> None:
        self._connection().execute(
            "INSERT OR REPLACE INTO dicom_receipts VALUES (?, ?, ?, ?)",
            (sop_uid, sha256, path, time.time()),
        )

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
