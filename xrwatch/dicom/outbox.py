"""The DICOM tables of the ledger: what was received, which SRs are due, what is to send.

They live in the daemon's ledger database (``ledger.sqlite3``), next to ``files``:

- ``dicom_received``: one row per SOP Instance UID the receiver acknowledged, so an
  instance sent again is acknowledged without being written (and classified) again;
- ``dicom_results``: one row per classified DICOM input, inserted in the same transaction
  as its outcome (:func:`on_finish`, a ledger finish hook), so no result is ever without
  its SR, even across ``kill -9``; ``pending`` until the SR is in ``REPORTS/dicom``;
- ``dicom_outbox``: one row per (SR or overlay, destination), ``pending`` until the
  destination acknowledged the C-STORE, then ``sent`` (recorded right after that one
  acknowledgement) and never sent again. A refused or unanswered C-STORE counts an
  attempt and waits (exponential back-off in ``next_attempt_at``, which survives
  restarts); after ``max_attempts`` the row is ``parked`` (dead letter: shown by
  ``status``, kept until :meth:`Outbox.requeue_parked`). A destination that cannot be
  reached at all delays its rows without counting attempts: no result is parked because
  the PACS was down.

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
from xrwatch.leases import owner_gone

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
    state           TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'parked')),
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
MAX_SR_ATTEMPTS = 8  # an SR that cannot be built this many times is 'failed' (parked)
MAX_SEND_ATTEMPTS = 10  # refused/unanswered C-STOREs before a send is parked (~15 min at 2 s first)


def backoff(attempts: int, first: float = BACKOFF_FIRST) -> float:
    """Seconds to wait after ``attempts`` failures (``first``, then doubling: 2, 4, 8 ...
    by default), capped at 5 min."""
    return float(min(first * 2 ** max(attempts - 1, 0), BACKOFF_MAX))


def on_finish(con: sqlite3.Connection, outcomes: list[tuple[int, str, dict[str, Any]]]) -> None:
    """Ledger finish hook: every DICOM input with a SOP Instance UID gets a pending SR row,
    in the transaction that records its outcome (classified, or not attempted and why)."""
    now = time.time()
    for row_id, _state, record in outcomes:
        sop = record.get("sop_instance_uid")
        if record.get("kind") != "dicom" or not sop:
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
    last_error: str | None = None


@dataclass(frozen=True)
class DueSend:
    id: int
    sr_sop_uid: str
    sr_path: str
    destination: str
    attempts: int
    file_id: int = 0
    last_error: str | None = None


def _migrate(con: sqlite3.Connection) -> None:
    """Ledgers from before parking: rebuild ``dicom_outbox`` with the wider state check."""
    row = con.execute(
        "SELECT sql FROM sqlite_master WHERE type='table' AND name='dicom_outbox'"
    ).fetchone()
    if row is None or "'parked'" in str(row[0]):
        return
    with immediate_transaction(con):
        con.execute("ALTER TABLE dicom_outbox RENAME TO dicom_outbox_old")
        con.execute("DROP INDEX IF EXISTS dicom_outbox_due")
        table = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS dicom_outbox") :]
        for statement in table.split(";"):
            if statement.strip():
                con.execute(statement)
        con.execute("INSERT INTO dicom_outbox SELECT * FROM dicom_outbox_old")
        con.execute("DROP TABLE dicom_outbox_old")


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
        _migrate(self._con())
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
                "f.archived_to, r.last_error FROM dicom_results r JOIN files f ON f.id = r.file_id "
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
            DueResult(int(r[0]), str(r[1]), str(r[2]), int(r[3]), json.loads(r[4]), r[5], r[6])
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

    def result_failed(self, file_id: int, attempts: int, error: str, *, park: bool = False) -> str:
        """Record a failed build; return the new state (``failed`` = parked: after
        ``MAX_SR_ATTEMPTS``, or at once with ``park`` for a source that can never give one)."""
        state = "failed" if park or attempts >= MAX_SR_ATTEMPTS else "pending"
        with self._tx() as con:
            con.execute(
                "UPDATE dicom_results SET state=?, attempts=?, next_attempt_at=?, owner=NULL, "
                "last_error=? WHERE file_id=?",
                (state, attempts, time.time() + backoff(attempts), error, file_id),
            )
        return state

    def drop_result(self, file_id: int) -> None:
        """No SR is due for ``file_id`` after all (its source is no image, or our own)."""
        with self._tx() as con:
            con.execute("DELETE FROM dicom_results WHERE file_id=?", (file_id,))

    def rebuild(self, file_id: int) -> None:
        """Build the SR (and overlay) of ``file_id`` again: its file in REPORTS is gone."""
        with self._tx() as con:
            con.execute(
                "UPDATE dicom_results SET state='pending', next_attempt_at=0, owner=NULL "
                "WHERE file_id=? AND state='written'",
                (file_id,),
            )

    # -- sends -------------------------------------------------------------------------
    def take_sends(self, destination: str, limit: int = 32) -> list[DueSend]:
        if not self._any_due("dicom_outbox", "AND destination=?", (destination,)):
            return []
        now = time.time()
        with self._tx() as con:
            rows = con.execute(
                "SELECT id, sr_sop_uid, sr_path, destination, attempts, file_id, last_error "
                "FROM dicom_outbox "
                "WHERE state='pending' AND destination=? AND next_attempt_at <= ? "
                "AND (owner IS NULL OR owner=? OR leased_until < ?) ORDER BY id LIMIT ?",
                (destination, now, self.owner, now, limit),
            ).fetchall()
            con.executemany(
                "UPDATE dicom_outbox SET owner=?, leased_until=? WHERE id=?",
                [(self.owner, now + LEASE_SECONDS, r[0]) for r in rows],
            )
        return [
            DueSend(int(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]), int(r[5]), r[6])
            for r in rows
        ]

    def sent(self, send_id: int) -> None:
        with self._tx() as con:
            con.execute(
                "UPDATE dicom_outbox SET state='sent', sent_at=?, attempts=attempts+1, "
                "owner=NULL, last_error=NULL WHERE id=?",
                (time.time(), send_id),
            )

    def send_failed(
        self,
        send_id: int,
        attempts: int,
        error: str,
        *,
        max_attempts: int = MAX_SEND_ATTEMPTS,
        first_wait: float = BACKOFF_FIRST,
    ) -> tuple[str, float]:
        """Record a refused or unanswered C-STORE (attempt ``attempts``); return the new
        state (``pending`` or ``parked``) and the seconds until the next attempt."""
        state = "parked" if attempts >= max_attempts else "pending"
        wait = backoff(attempts, first_wait)
        with self._tx() as con:
            con.execute(
                "UPDATE dicom_outbox SET state=?, attempts=?, next_attempt_at=?, owner=NULL, "
                "last_error=? WHERE id=? AND state='pending'",
                (state, attempts, time.time() + wait, error, send_id),
            )
        return state, wait

    def defer(self, send_ids: list[int], wait: float, error: str | None) -> None:
        """Put sends back untried (the destination unreachable: no attempt is counted;
        ``error`` None: not reached in this association, tried again at once)."""
        with self._tx() as con:
            con.executemany(
                "UPDATE dicom_outbox SET next_attempt_at=?, owner=NULL, "
                "last_error=COALESCE(?, last_error) WHERE id=? AND state='pending'",
                [(time.time() + wait, error, i) for i in send_ids],
            )

    def requeue_parked(self, destination: str | None = None) -> int:
        """Give parked sends (of ``destination``, or all) a fresh set of attempts."""
        where, args = ("AND destination=?", (destination,)) if destination else ("", ())
        with self._tx() as con:
            cur = con.execute(
                "UPDATE dicom_outbox SET state='pending', attempts=0, next_attempt_at=0 "
                f"WHERE state='parked' {where}",
                args,
            )
            return int(cur.rowcount)

    # -- status ------------------------------------------------------------------------
    def destination_counts(self) -> dict[str, dict[str, Any]]:
        """Per destination: sent, pending, parked, failed attempts so far, the last error."""
        out: dict[str, dict[str, Any]] = {}
        rows = self._con().execute(
            "SELECT destination, SUM(state='sent'), SUM(state='pending'), SUM(state='parked'), "
            "SUM(attempts) - SUM(state='sent') FROM dicom_outbox "
            "GROUP BY destination ORDER BY destination"
        )
        for dest, sent, pending, parked, failures in rows:
            out[str(dest)] = {
                "sent": int(sent or 0),
                "pending": int(pending or 0),
                "parked": int(parked or 0),
                "failed_attempts": int(failures or 0),
                "last_error": None,
            }
        for dest, err, _ in self._con().execute(  # SQLite: bare columns of the MAX row
            "SELECT destination, last_error, MAX(id) FROM dicom_outbox "
            "WHERE last_error IS NOT NULL AND state IN ('pending', 'parked') "
            "GROUP BY destination"
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

    def parked(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest parked sends and SRs that could not be built, with their errors."""
        con = self._con()
        out = [
            {"what": "send", "sop_instance_uid": str(uid), "destination": str(dest),
             "attempts": int(n), "error": err}
            for uid, dest, n, err in con.execute(
                "SELECT sr_sop_uid, destination, attempts, last_error FROM dicom_outbox "
                "WHERE state='parked' ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        ]  # fmt: skip
        out += [
            {"what": "build", "source": str(path), "attempts": int(n), "error": err}
            for path, n, err in con.execute(
                "SELECT source_path, attempts, last_error FROM dicom_results "
                "WHERE state='failed' ORDER BY file_id DESC LIMIT ?",
                (limit,),
            )
        ]
        return out
