"""Descriptors over watch restarts (#21 item 7), against a real ``xrwatch serve``.

INCOMING removed and made again, 12 times (the red team's 30 gave 13 -> 59; a leak of
two per restart shows as 22 here): each time the watch ends and is started again
with new threads, and each new thread that asks the ledger opens its own connection (the
database and its WAL: two descriptors). The threads of an ended watch are gone, so their
connections must go with them: the daemon's ledger and inotify descriptors are the same
after the 12th restart as after the first (one worker, so that the threads that hold a
connection are the same few each time: main, heartbeat, worker, the watch's).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from serve_harness import csv_rows, make_png, wait_for

from tests.helpers.procs import fd_targets


def _held(pid: int) -> dict[str, int]:
    """The daemon's descriptors on the ledger (database, WAL) and inotify instances."""
    counts = {"ledger": 0, "inotify": 0}
    for target in fd_targets(pid):
        if target.endswith(("ledger.sqlite3", "ledger.sqlite3-wal")):
            counts["ledger"] += 1
        elif target == "anon_inode:inotify":
            counts["inotify"] += 1
    return counts


def _logged(d, text: str) -> int:  # type: ignore[no-untyped-def]
    return sum(text in e["message"] for e in d.log_events())


def test_incoming_recreated_12_times_leaks_no_descriptors(folders, daemons, tmp_path: Path) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports, "--rescan-interval", "0.3", "--workers", "1").start()
    assert d.proc is not None
    held = []
    for i in range(12):
        gone, restarted = _logged(d, "is gone"), _logged(d, "starting it again")
        shutil.rmtree(incoming)
        wait_for(lambda: _logged(d, "is gone") > gone, 60, "the removal noticed")  # noqa: B023
        incoming.mkdir()
        wait_for(
            lambda: _logged(d, "starting it again") > restarted,  # noqa: B023
            60,
            "the watch started again",
        )
        # a folder moved in: the new watch's own thread scans it and asks the ledger
        made = make_png(tmp_path / "staging" / f"s{i}" / "x.png", seed=100 + i).parent
        os.rename(made, incoming / made.name)
        wait_for(lambda: len(csv_rows(reports)) == i + 1, 60, f"file {i + 1} reported")  # noqa: B023
        held.append(_held(d.proc.pid))
    assert d.stop() == 0
    assert held[-1] == held[0], held  # the first restart's threads are the steady state
    assert held[0]["inotify"] == 1, held
