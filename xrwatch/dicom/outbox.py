"""The DICOM tables of the ledger: what was received, which SRs are due, what is to send.

They live in the daemon's ledger database (``ledger.sqlite3``), next to ``files``:

- ``dicom_received``: one row per SOP Instance UID the receiver acknowledged, so an
  instance sent again is acknowledged without being written (and classified) again;
- ``dicom_results``: one row per classified DICOM input, inserted in the same transaction
  as its outcome (:func:`on_finish`, a ledger finish hook), so no result is ever without
  its SR, even across ``kill -9``; ``pending`` until the SR is in ``REPORTS/dicom``;
- ``dicom_outbox``: one row per (SR, destination), ``pending`` until the destination
  acknowledged the C-STORE, then ``sent`` and never sent again. Failures set
  ``next_attempt_at`` (back-off), which survives restarts.

A row being worked on is leased (``owner``, ``leased_until``) so that two daemons on one
state dir never send the same SR at the same time; a lease of a dead daemon is void.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xrwatch import fields
from xrwatch.atomic import immediate_transaction
from xrwatch.serve.ledger import owner_gone

SCHEMA = """
CREATE TABLE IF NOT EXISTS dicom_received (
    sop_instance_uid TEXT PRIMARY KEY,
    path             TEXT NOT NULL,  -- relative to INCOMING
    calling_ae       TEXT NOT NULL,
    received_at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dicom_results (
    file_id         INTEGER PRIMARY KEY,  -- files.id of the classified DICOM input
    source_path     TEXT NOT NULL,        -- files.path
    source_sop_uid  TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'written', 'failed')),
    sr_sop_uid      TEXT,
    sr_path         TEXT,                 -- relative to REPORTS
    sc_path         TEXT,                 -- the heatmap overlay's, when the model has one
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    owner           TEXT,
    leased_until    REAL NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dicom_results_due ON dicom_results (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS dicom_outbox (
    id              INTEGER PRIMARY KEY,
    file_id         INTEGER NOT NULL,
    sr_sop_uid      TEXT NOT NULL,        -- of the instance to send: the SR, or the overlay
    sr_path         TEXT NOT NULL,        -- relative to REPORTS
    destination     TEXT NOT NULL,        -- AE@host:port
    state           TEXT NOT NULL CHECK (state IN ('pending', 'sent')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    owner           TEXT,
    leased_until    REAL NOT NULL DEFAULT 0,
    last_error      TEXT,
    sent_at         REAL,
    UNIQUE (sr_sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS dicom_outbox_due ON dicom_outbox (state, next_attempt_at);
"""

LEASE_SECONDS = 120.0  # a row taken by a live daemon is left alone this long
BACKOFF_FIRST = 2.0  # seconds before the first retry; doubles per failure
BACKOFF_MAX = 300.0
MAX_SR_ATTEMPTS = 8  # an SR that cannot be built this many times is 'failed' (see status)


def backoff(attempts: int) -> float:
    """Seconds to wait after ``attempts`` failures (2, 4, 8 ... capped at 5 min)."""
    return float(min(BACKOFF_FIRST * 2 ** max(attempts - 1, 0), BACKOFF_MAX))


def on_finish(con: sqlite3.Connection, outcomes: list[tuple[int, str, dict[str, Any]]]) -> None:
    """Ledger finish hook: every DICOM input classified ok gets a pending SR row, in the
    transaction that records its outcome."""
    now = time.time()
    for row_id, state, record in outcomes:
        sop = record.get("sop_instance_uid")
        if state != "ok" or record.get("kind") != "dicom" or not sop:
            continue
        con.execute(
            "INSERT OR IGNORE INTO dicom_results (file_id, source_path, source_sop_uid, state, "
            "created_at) VALUES (?, ?, ?, 'pending', ?)",
            (row_id, record[fields.FILE], sop, now),
        )


@dataclass(frozen=True)
class DueResult:
    file_id: int
    source_path: str
    source_sop_uid: str
    attempts: int
    record: dict[str, Any]
    archived_to: str | None


@dataclass(frozen=True)
class DueSend:
    id: int
    sr_sop_uid: str
    sr_path: str
    destination: str
    attempts: int


class Outbox:
    """Access to the DICOM tables of the ledger at ``db`` (one connection per thread)."""

    def __init__(self, db: Path, owner: str = "", *, shared: bool = False) -> None:
        """``shared``: one connection for every thread (the caller serialises its use),
        for callers on short-lived threads such as pynetdicom's association threads."""
        self.db = Path(db)
        self._shared = shared
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self._local = threading.local()
        self._connection: sqlite3.Connection | None = None
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _con(self) -> sqlite3.Connection:
        holder = self if self._shared else self._local
        con: sqlite3.Connection | None = getattr(holder, "_connection", None)
        if con is None:
            # Each thread uses only its own connection (or, shared, the caller serialises
            # use); check_same_thread=False lets close() at stop, on whichever thread stops
            # the node, close the connections that the worker threads opened.
            con = sqlite3.connect(
                self.db, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # an acknowledgement is a promise
            con.execute("PRAGMA busy_timeout=30000")
            holder._connection = con
            with self._lock:
                self._all.append(con)
        return con

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._con())

    def create(self) -> None:
        self._con().executescript(SCHEMA)

    def close(self) -> None:
        """Close every thread's connection; call once the threads using them have stopped."""
        with self._lock:
            for con in self._all:
                con.close()
            self._all.clear()
        self._local = threading.local()
        self._connection = None

    def has_tables(self) -> bool:
        row = (
            self._con()
            .execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='dicom_outbox'")
            .fetchone()
        )
        return row is not None

    # -- received ----------------------------------------------------------------------
    def received_path(self, sop_uid: str) -> str | None:
        row = (
            self._con()
            .execute("SELECT path FROM dicom_received WHERE sop_instance_uid=?", (sop_uid,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    def record_received(self, sop_uid: str, path: str, calling_ae: str) -> None:
        with self._tx() as con:
            con.execute(
                "INSERT OR IGNORE INTO dicom_received VALUES (?, ?, ?, ?)",
                (sop_uid, path, calling_ae, time.time()),
            )

    # -- leases ------------------------------------------------------------------------
    def release_dead_leases(self) -> None:
        """Void the leases of daemons on this host that are gone (killed with -9)."""
        host = socket.gethostname()
        with self._tx() as con:
            for table in ("dicom_results", "dicom_outbox"):
                owners = [r[0] for r in con.execute(f"SELECT DISTINCT owner FROM {table}")]
                for owner in owners:
                    if owner is None or owner == self.owner:
                        continue
                    # the same rule as the ledger's claims (pid reuse told apart by start time)
                    if owner_gone(con, owner, host, LEASE_SECONDS):
                        con.execute(
                            f"UPDATE {table} SET owner=NULL, leased_until=0 WHERE owner=?",
                            (owner,),
                        )

    # -- SRs to build ------------------------------------------------------------------
    def _any_due(self, table: str, where: str = "", args: tuple[Any, ...] = ()) -> bool:
        """A read without the write lock, so that an idle worker never blocks the daemon."""
        row = (
            self._con()
            .execute(
                f"SELECT 1 FROM {table} WHERE state='pending' AND next_attempt_at <= ? "
                f"{where} LIMIT 1",
                (time.time(), *args),
            )
            .fetchone()
        )
        return row is not None

    def take_results(self, limit: int = 16) -> list[DueResult]:
        if not self._any_due("dicom_results"):
            return []
        now = time.time()
        with self._tx() as con:
            rows = con.execute(
                "SELECT r.file_id, r.source_path, r.source_sop_uid, r.attempts, f.record, "
                "f.archived_to FROM dicom_results r JOIN files f ON f.id = r.file_id "
                "WHERE r.state='pending' AND r.next_attempt_at <= ? "
                "AND (r.owner IS NULL OR r.owner=? OR r.leased_until < ?) "
                "ORDER BY r.file_id LIMIT ?",
                (now, self.owner, now, limit),
            ).fetchall()
            con.executemany(
                "UPDATE dicom_results SET owner=?, leased_until=? WHERE file_id=?",
                [(self.owner, now + LEASE_SECONDS, r[0]) for r in rows],
            )
        return [
            DueResult(int(r[0]), str(r[1]), str(r[2]), int(r[3]), json.loads(r[4]), r[5])
            for r in rows
        ]

    def result_written(
        self, file_id: int, written: list[tuple[str, str]], destinations: list[str]
    ) -> None:
        """The SR (and overlay), ``[(SOP Instance UID, path)]``, are durably in REPORTS:
        queue each for every destination, in one transaction."""
        (sr_uid, sr_path), *others = written
        with self._tx() as con:
            con.execute(
                "UPDATE dicom_results SET state='written', sr_sop_uid=?, sr_path=?, sc_path=?, "
                "owner=NULL, last_error=NULL WHERE file_id=?",
                (sr_uid, sr_path, others[0][1] if others else None, file_id),
            )
            con.executemany(
                "INSERT OR IGNORE INTO dicom_outbox (file_id, sr_sop_uid, sr_path, destination, "
                "state) VALUES (?, ?, ?, ?, 'pending')",
                [(file_id, uid, path, d) for uid, path in written for d in destinations],
            )

    def result_failed(self, file_id: int, attempts: int, error: str) -> None:
        state = "failed" if attempts >= MAX_SR_ATTEMPTS else "pending"
        with self._tx() as con:
            con.execute(
                "UPDATE dicom_results SET state=?, attempts=?, next_attempt_at=?, owner=NULL, "
                "last_error=? WHERE file_id=?",
                (state, attempts, time.time() + backoff(attempts), error, file_id),
            )

    # -- sends -------------------------------------------------------------------------
    def take_sends(self, destination: str, limit: int = 32) -> list[DueSend]:
        if not self._any_due("dicom_outbox", "AND destination=?", (destination,)):
            return []
        now = time.time()
        with self._tx() as con:
            rows = con.execute(
                "SELECT id, sr_sop_uid, sr_path, destination, attempts FROM dicom_outbox "
                "WHERE state='pending' AND destination=? AND next_attempt_at <= ? "
                "AND (owner IS NULL OR owner=? OR leased_until < ?) ORDER BY id LIMIT ?",
                (destination, now, self.owner, now, limit),
            ).fetchall()
            con.executemany(
                "UPDATE dicom_outbox SET owner=?, leased_until=? WHERE id=?",
                [(self.owner, now + LEASE_SECONDS, r[0]) for r in rows],
            )
        return [DueSend(int(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4])) for r in rows]

    def sent(self, send_id: int) -> None:
        with self._tx() as con:
            con.execute(
                "UPDATE dicom_outbox SET state='sent', sent_at=?, attempts=attempts+1, "
                "owner=NULL, last_error=NULL WHERE id=?",
                (time.time(), send_id),
            )

    def send_failed(self, send_id: int, attempts: int, error: str) -> float:
        """Record a failed attempt; return the seconds until the next one."""
        wait = backoff(attempts)
        with self._tx() as con:
            con.execute(
                "UPDATE dicom_outbox SET attempts=?, next_attempt_at=?, owner=NULL, "
                "last_error=? WHERE id=?",
                (attempts, time.time() + wait, error, send_id),
            )
        return wait

    # -- status ------------------------------------------------------------------------
    def destination_counts(self) -> dict[str, dict[str, Any]]:
        """Per destination: sent, pending, failed attempts so far and the last error."""
        out: dict[str, dict[str, Any]] = {}
        rows = self._con().execute(
            "SELECT destination, SUM(state='sent'), SUM(state='pending'), SUM(attempts) - "
            "SUM(state='sent') FROM dicom_outbox GROUP BY destination ORDER BY destination"
        )
        for dest, sent, pending, failures in rows:
            out[str(dest)] = {
                "sent": int(sent or 0),
                "pending": int(pending or 0),
                "failed_attempts": int(failures or 0),
                "last_error": None,
            }
        for dest, err, _ in self._con().execute(  # SQLite: bare columns of the MAX row
            "SELECT destination, last_error, MAX(id) FROM dicom_outbox "
            "WHERE last_error IS NOT NULL AND state='pending' GROUP BY destination"
        ):
            if str(dest) in out:
                out[str(dest)]["last_error"] = str(err)
        return out

    def result_counts(self) -> dict[str, int]:
        rows = self._con().execute("SELECT state, COUNT(*) FROM dicom_results GROUP BY state")
        counts = {"pending": 0, "written": 0, "failed": 0}
        counts.update({str(s): int(n) for s, n in rows})
        counts["received"] = int(
            self._con().execute("SELECT COUNT(*) FROM dicom_received").fetchone()[0]
        )
        return counts
