"""Whether a daemon that holds claims or leases is gone: one rule for the serve ledger's
claims (:mod:`xrwatch.serve.ledger`) and the DICOM outbox's leases
(:mod:`xrwatch.dicom.outbox`).

Both tables name their holder by the ``owner`` of its row in the ledger database's
``daemons`` table (host, pid, heartbeat, process start). On the owner's host the process
decides: its pid is dead, or now belongs to another process (told apart by the process
start time); from another host, no heartbeat for the lease. This module sits below both
``xrwatch.serve`` and ``xrwatch.dicom`` so that neither imports the other for it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path


def process_start(pid: int) -> str | None:
    """``boot_id:starttime`` of ``pid`` (Linux), None when unknown or the pid is dead.

    A pid alone does not name a process: in a container a restarted daemon usually gets
    the very pid of the one that died.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()  # after "pid (comm) "
    return f"{boot}:{fields[19].decode()}" if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(con: sqlite3.Connection, owner: str | None, host: str, lease_seconds: float) -> bool:
    """Whether the daemon ``owner`` (as registered in the ``daemons`` table) is gone, so that
    its claims and leases may be taken over. One rule for the ledger and the DICOM outbox."""
    if owner is None:
        return True
    row = con.execute(
        "SELECT host, pid, heartbeat_at, proc_start FROM daemons WHERE owner=?", (owner,)
    ).fetchone()
    if row is None:
        return True
    owner_host, pid, heartbeat_at, proc_start = row
    silent = time.time() - float(heartbeat_at)
    if owner_host == host:
        # On this host the process decides: a live daemon busy with a long batch keeps
        # its claims. A pid now held by another process (ours, after a container
        # restart) is told apart by its start time; the long silence bound only covers
        # ledgers written before start times were recorded.
        if not pid_alive(int(pid)):
            return True
        if proc_start is not None and process_start(int(pid)) not in (None, proc_start):
            return True
        return silent > 10 * lease_seconds
    return bool(silent > lease_seconds)
