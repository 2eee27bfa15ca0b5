"""The ledger: a SQLite database (WAL) that is the source of truth for every file.

One row per (path, identity), where identity is the content's sha256 (or a stand-in for a
file whose bytes cannot be read). A row is first a *claim* (``state='claimed'``, owned by
one daemon), then an outcome (``ok`` or ``error``) with its report record, and finally
``reported=1`` once its CSV row is on disk. Claims are taken inside ``BEGIN IMMEDIATE``
against a UNIQUE key, so two daemons on one state dir never process the same file twice.

A claim whose owner is gone (on this host: its pid is dead or now belongs to another
process, told apart by the process start time; from another host: no heartbeat for
``lease_seconds``) is taken over, so a file claimed by a daemon killed with ``kill -9`` is processed
again after the restart; it never reached the reports, because outcomes are committed here
before any report row is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xrwatch.atomic import immediate_transaction
from xrwatch.errors import XRWatchError
from xrwatch.leases import owner_gone, process_start
from xrwatch.leases import pid_alive as _pid_alive  # noqa: F401  (xrwatch status uses it)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id          INTEGER PRIMARY KEY,
    path        TEXT NOT NULL,     -- relative to INCOMING, '/'-separated
    identity    TEXT NOT NULL,     -- sha256 of the content, or a stand-in (see module doc)
    sha256      TEXT NOT NULL,     -- '' when the bytes could not be read
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    ctime_ns    INTEGER,           -- with inode: a same-size-and-mtime replacement differs
    inode       INTEGER,
    state       TEXT NOT NULL CHECK (state IN ('claimed', 'ok', 'error')),
    owner       TEXT,
    seen_at     REAL,
    claimed_at  REAL,
    finished_at REAL,
    error       TEXT,
    record      TEXT,              -- the JSON report record, once finished
    reported    INTEGER NOT NULL DEFAULT 0,
    archived_to TEXT,
    UNIQUE (path, identity)
);
CREATE INDEX IF NOT EXISTS files_stat ON files (path, size, mtime_ns);
CREATE INDEX IF NOT EXISTS files_unreported ON files (reported, state);
CREATE INDEX IF NOT EXISTS files_finished ON files (finished_at);
CREATE TABLE IF NOT EXISTS daemons (
    owner        TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    proc_start   TEXT,             -- boot id + the pid's start time: a reused pid differs
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    incoming     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Columns added after schema 1 was released: (table, column, declaration). Added to an
# existing ledger at open; a ledger without them is still read by older versions.
_ADDED_COLUMNS = (
    ("files", "report_error", "TEXT"),  # why this row's report could not be written (held)
    ("files", "report_retry_at", "REAL"),  # a held row is tried again from this time on
    ("files", "ctime_ns", "INTEGER"),  # with inode: a same-size-and-mtime replacement differs
    ("files", "inode", "INTEGER"),
    ("daemons", "proc_start", "TEXT"),  # boot id + start time: a reused pid differs
)


FinishHook = Callable[[sqlite3.Connection, list[tuple[int, str, dict[str, Any]]]], None]


class LedgerError(XRWatchError):
    """The ledger database cannot be opened or written."""


@dataclass(frozen=True)
class Finished:
    """A finished row, as the report writers need it."""

    id: int
    path: str
    sha256: str
    state: str
    record: dict[str, Any]


class _Held:
    """One thread's connection, held in its thread-local storage: it goes when the
    thread ends, and its finalizer then closes the connection."""

    __slots__ = ("__weakref__", "con")

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con


def _release(
    con: sqlite3.Connection, every: list[sqlite3.Connection], lock: threading.RLock
) -> None:
    with lock:
        if con in every:
            every.remove(con)
    with contextlib.suppress(sqlite3.Error):
        con.close()


class Ledger:
    """Thread-safe access to the ledger; each thread gets its own connection, closed when
    the thread ends (or at :meth:`close`)."""

    def __init__(self, state_dir: Path, *, lease_seconds: float = 30.0) -> None:
        self.path = Path(state_dir) / "ledger.sqlite3"
        self.lease_seconds = lease_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._host = socket.gethostname()
        self._local = threading.local()
        self._owner_thread = threading.current_thread()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.RLock()  # also taken by a thread's finalizer (_release)
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            self._con().executescript(_SCHEMA)  # idempotent; executescript commits itself
            self._add_columns()
            with self._tx() as con:
                con.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"{self.path}: cannot open the ledger database: {exc}") from exc

    def _add_columns(self) -> None:
        with self._tx() as con:
            for table, column, decl in _ADDED_COLUMNS:
                have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    # -- connections -------------------------------------------------------------------
    def _con(self) -> sqlite3.Connection:
        held: _Held | None = getattr(self._local, "held", None)
        if held is None:
            # check_same_thread=False: only this thread uses it, but close() (at shutdown)
            # and the end of the thread close it from elsewhere
            con = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            con.execute("PRAGMA journal_mode=WAL")
            # Outcomes and report marks (main thread) are durable before the report row is
            # written (FULL). Claims (worker threads) may use NORMAL: WAL order means a
            # later FULL commit persists them too, and a claim lost to a power cut only
            # means the file is processed again, never reported twice.
            sync = "FULL" if threading.current_thread() is self._owner_thread else "NORMAL"
            con.execute(f"PRAGMA synchronous={sync}")
            con.execute("PRAGMA busy_timeout=30000")
            held = self._local.held = _Held(con)
            with self._lock:
                self._all.append(con)
            # A thread's connection (two descriptors: the database and its WAL) is closed
            # when the thread ends, as the watch's threads do at each restart of the watch
            weakref.finalize(held, _release, con, self._all, self._lock)
        return held.con

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._con())

    def close(self) -> None:
        with self._lock:
            for con in self._all:
                try:
                    con.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()

    # -- daemons -----------------------------------------------------------------------
    def register(self, incoming: Path) -> None:
        now = time.time()
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO daemons (owner, host, pid, proc_start, started_at, "
                "heartbeat_at, incoming) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    self.owner,
                    self._host,
                    os.getpid(),
                    process_start(os.getpid()),
                    now,
                    now,
                    os.fsencode(str(incoming)).decode("utf-8", "replace"),
                ),
            )

    def heartbeat(self) -> None:
        with self._tx() as con:
            con.execute(
                "UPDATE daemons SET heartbeat_at=? WHERE owner=?", (time.time(), self.owner)
            )

    def unregister(self) -> None:
        """Forget this daemon and release any claim it still holds (graceful exit only)."""
        with self._tx() as con:
            con.execute("DELETE FROM files WHERE owner=? AND state='claimed'", (self.owner,))
            con.execute("DELETE FROM daemons WHERE owner=?", (self.owner,))

    def _owner_gone(self, con: sqlite3.Connection, owner: str | None) -> bool:
        return owner_gone(con, owner, self._host, self.lease_seconds)

    # -- files -------------------------------------------------------------------------
    def is_finished(self, path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> bool:
        """Fast path: the content last finished at ``path`` had this size, mtime, ctime and
        inode (no hashing). A replacement keeping size and mtime has another ctime/inode."""
        row = (
            self._con()
            .execute(
                "SELECT size, mtime_ns, ctime_ns, inode FROM files WHERE path=? "
                "AND state IN ('ok', 'error') ORDER BY finished_at DESC, id DESC LIMIT 1",
                (path,),
            )
            .fetchone()
        )
        return row is not None and tuple(row) == (size, mtime_ns, ctime_ns, inode)

    def seen_again(
        self, row_id: int, size: int, mtime_ns: int, ctime_ns: int, inode: int
    ) -> dict[str, Any] | None:
        """A finished row's content is at its path again: note its stat (for the fast
        path) and make it the path's latest. Returns its record when another content had
        been finished at that path since (A, then B, then A again: the JSON must say A)."""
        with self._tx() as con:
            row = con.execute("SELECT path, record FROM files WHERE id=?", (row_id,)).fetchone()
            if row is None:
                return None
            path, record = row
            latest = con.execute(
                "SELECT id FROM files WHERE path=? AND state IN ('ok', 'error') "
                "ORDER BY finished_at DESC, id DESC LIMIT 1",
                (path,),
            ).fetchone()
            newer = latest is not None and int(latest[0]) != row_id
            con.execute(
                "UPDATE files SET size=?, mtime_ns=?, ctime_ns=?, inode=?"
                + (", finished_at=?" if newer else "")
                + " WHERE id=?",
                (size, mtime_ns, ctime_ns, inode, *((time.time(),) if newer else ()), row_id),
            )
        return json.loads(record) if newer and record else None

    def finished_row(self, path: str, identity: str) -> tuple[int, str, str | None] | None:
        """``(id, state, archived_to)`` when (path, identity) is finished, else None."""
        row = (
            self._con()
            .execute(
                "SELECT id, state, archived_to FROM files WHERE path=? AND identity=? "
                "AND state IN ('ok', 'error')",
                (path, identity),
            )
            .fetchone()
        )
        return None if row is None else (int(row[0]), str(row[1]), row[2])

    def claim(
        self,
        path: str,
        identity: str,
        sha256: str,
        size: int,
        mtime_ns: int,
        seen_at: float,
        ctime_ns: int | None = None,
        inode: int | None = None,
    ) -> int | None:
        """Claim (path, identity) for this daemon; return the row id, or None if another
        daemon holds it or it is already finished."""
        now = time.time()
        with self._tx() as con:
            row = con.execute(
                "SELECT id, state, owner FROM files WHERE path=? AND identity=?",
                (path, identity),
            ).fetchone()
            if row is None:
                cur = con.execute(
                    "INSERT INTO files (path, identity, sha256, size, mtime_ns, ctime_ns, inode, "
                    "state, owner, seen_at, claimed_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, 'claimed', ?, ?, ?)",
                    (
                        path,
                        identity,
                        sha256,
                        size,
                        mtime_ns,
                        ctime_ns,
                        inode,
                        self.owner,
                        seen_at,
                        now,
                    ),
                )
                return int(cur.lastrowid or 0)
            row_id, state, owner = int(row[0]), str(row[1]), row[2]
            if state != "claimed" or owner == self.owner:
                return None
            if not self._owner_gone(con, owner):
                return None
            logger.info("taking over %s: its claim by %s is stale", path, owner)
            con.execute(
                "UPDATE files SET owner=?, claimed_at=?, size=?, mtime_ns=?, ctime_ns=?, inode=?, "
                "seen_at=? WHERE id=?",
                (self.owner, now, size, mtime_ns, ctime_ns, inode, seen_at, row_id),
            )
            return row_id

    def release(self, row_id: int) -> None:
        """Give a claim back (the file turned out not to be complete yet)."""
        with self._tx() as con:
            con.execute(
                "DELETE FROM files WHERE id=? AND owner=? AND state='claimed'",
                (row_id, self.owner),
            )

    def finish(
        self,
        outcomes: Iterable[tuple[int, str, dict[str, Any]]],
        hooks: Iterable[FinishHook] = (),
    ) -> None:
        """Record outcomes ``(row_id, 'ok'|'error', record)`` in one transaction; each of
        ``hooks`` runs inside it (e.g. to queue a DICOM result with its outcome)."""
        now = time.time()
        rows = list(outcomes)
        with self._tx() as con:
            for row_id, state, record in rows:
                con.execute(
                    "UPDATE files SET state=?, finished_at=?, error=?, record=? "
                    "WHERE id=? AND owner=? AND state='claimed'",
                    (
                        state,
                        now,
                        record.get("error") or None,
                        json.dumps(record, sort_keys=True),
                        row_id,
                        self.owner,
                    ),
                )
            for hook in hooks:
                hook(con, rows)

    # -- reporting: reported 0 -> 2 (being written at a recorded CSV offset) -> 1 ----------
    def unreported(self, limit: int = 10_000) -> list[Finished]:
        """Finished rows not yet in the reports, except held rows not yet due again."""
        rows = (
            self._con()
            .execute(
                "SELECT id, path, sha256, state, record FROM files "
                "WHERE reported=0 AND state IN ('ok', 'error') "
                "AND (report_retry_at IS NULL OR report_retry_at <= ?) "
                "ORDER BY finished_at, id LIMIT ?",
                (time.time(), limit),
            )
            .fetchall()
        )
        return [Finished(int(r[0]), r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def hold_report(self, held: list[tuple[int, str]], retry_after: float) -> None:
        """Rows ``(id, reason)`` whose report could not be written: set aside (the others go
        on) and tried again ``retry_after`` seconds from now, and at every start."""
        retry_at = time.time() + retry_after
        with self._tx() as con:
            con.executemany(
                "UPDATE files SET report_error=?, report_retry_at=? WHERE id=?",
                [(reason, retry_at, row_id) for row_id, reason in held],
            )

    def retry_held_reports(self) -> None:
        """Make every held row due now (at start: whatever held it may have been fixed)."""
        with self._tx() as con:
            con.execute("UPDATE files SET report_retry_at=NULL WHERE report_retry_at IS NOT NULL")

    def unreported_counts(self) -> tuple[int, int]:
        """``(finished but not in the reports, of which held by a failed write)``."""
        row = (
            self._con()
            .execute(
                "SELECT COUNT(*), COUNT(report_error) FROM files "
                "WHERE reported IN (0, 2) AND state IN ('ok', 'error')"
            )
            .fetchone()
        )
        return int(row[0]), int(row[1])

    def held_reports(self, n: int = 5) -> list[tuple[str, str]]:
        """``(path, reason)`` of up to ``n`` rows whose report could not be written."""
        rows = (
            self._con()
            .execute(
                "SELECT path, report_error FROM files WHERE reported!=1 "
                "AND report_error IS NOT NULL ORDER BY finished_at, id LIMIT ?",
                (n,),
            )
            .fetchall()
        )
        return [(str(p), str(e)) for p, e in rows]

    def mark_reporting(self, row_ids: list[int], csv_path: str, offset: int) -> None:
        """Before appending rows: remember where the append starts, so that a writer killed
        mid-append can be undone exactly (see :meth:`pending_report`)."""
        with self._tx() as con:
            con.executemany("UPDATE files SET reported=2 WHERE id=?", [(i,) for i in row_ids])
            con.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('report_pending', ?)",
                (json.dumps({"csv": csv_path, "offset": offset}),),
            )

    def mark_reported(self, row_ids: list[int]) -> None:
        with self._tx() as con:
            con.executemany(
                "UPDATE files SET reported=1, report_error=NULL, report_retry_at=NULL WHERE id=?",
                [(i,) for i in row_ids],
            )
            con.execute("DELETE FROM meta WHERE key='report_pending'")

    def pending_report(self) -> tuple[str, int] | None:
        """``(csv_path, offset)`` of an append that never completed (its writer died)."""
        row = self._con().execute("SELECT value FROM meta WHERE key='report_pending'").fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        return str(data["csv"]), int(data["offset"])

    def reset_reporting(self) -> None:
        """Undo an incomplete append: its rows go back to 'not reported'."""
        with self._tx() as con:
            con.execute("UPDATE files SET reported=0 WHERE reported=2")
            con.execute("DELETE FROM meta WHERE key='report_pending'")

    def set_archived(self, row_id: int, dest: str) -> None:
        with self._tx() as con:
            con.execute("UPDATE files SET archived_to=? WHERE id=?", (dest, row_id))

    # -- status ------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        rows = self._con().execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall()
        return {str(state): int(n) for state, n in rows}

    def finished_since(self, since: float) -> int:
        row = (
            self._con()
            .execute("SELECT COUNT(*) FROM files WHERE finished_at >= ?", (since,))
            .fetchone()
        )
        return int(row[0])

    def last_errors(self, n: int = 5) -> list[tuple[float, str, str]]:
        rows = (
            self._con()
            .execute(
                "SELECT finished_at, path, error FROM files WHERE state='error' "
                "ORDER BY finished_at DESC, id DESC LIMIT ?",
                (n,),
            )
            .fetchall()
        )
        return [(float(t), str(p), str(e)) for t, p, e in rows]

    def daemons(self) -> list[dict[str, Any]]:
        rows = (
            self._con()
            .execute("SELECT owner, host, pid, started_at, heartbeat_at, incoming FROM daemons")
            .fetchall()
        )
        keys = ("owner", "host", "pid", "started_at", "heartbeat_at", "incoming")
        return [dict(zip(keys, r, strict=True)) for r in rows]
