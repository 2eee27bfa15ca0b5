"""Exactly once across crashes and concurrency: kill -9 mid-burst and restart, two daemons
on one folder, SIGTERM mid-batch, and an append torn by a killed writer."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

from serve_harness import assert_csv_intact, csv_rows, make_png, wait_for

from xrwatch.serve.ledger import Ledger
from xrwatch.serve.reports import ReportWriter


def _ledger_states(state_dir: Path) -> Counter[str]:
    con = sqlite3.connect(state_dir / "ledger.sqlite3", timeout=30)
    try:
        return Counter(s for (s,) in con.execute("SELECT state FROM files"))
    finally:
        con.close()


def test_kill_9_mid_burst_then_restart_gives_exactly_once(folders, daemons) -> None:
    incoming, reports = folders
    n = 240
    names = [f"b{i % 3}/k{i:03d}.png" for i in range(n)]
    for i, name in enumerate(names[:120]):
        make_png(incoming / name, seed=5000 + i, size=16)
    kills = 0
    d = daemons(incoming, reports, "--batch-size", "4").start()
    for i, name in enumerate(names[120:], start=120):  # more arrive while it works
        make_png(incoming / name, seed=5000 + i, size=16)
    # kill it three times at different moments of the burst, restarting each time
    for threshold in (20, 90, 170):
        wait_for(lambda t=threshold: len(csv_rows(reports)) >= t, 120, f"{threshold} rows")
        d.kill9()
        kills += 1
        d = daemons(incoming, reports, "--batch-size", "4").start()
    wait_for(lambda: len(csv_rows(reports)) >= n, 180, f"all {n} rows")
    time.sleep(1.0)
    assert d.stop() == 0
    rows = assert_csv_intact(reports)
    counts = Counter(r["file"] for r in rows)
    assert sorted(counts) == sorted(names), "a file is missing"
    assert max(counts.values()) == 1, [f for f, c in counts.items() if c > 1]
    assert len(list((reports / "json").rglob("*.json"))) == n
    states = _ledger_states(reports / "state")
    assert states == Counter({"ok": n}), states
    assert kills == 3


def test_two_daemons_on_one_folder_never_process_a_file_twice(folders, daemons) -> None:
    incoming, reports = folders
    a = daemons(incoming, reports, "--batch-size", "4").start()
    b = daemons(incoming, reports, "--batch-size", "4").start()

    def predictions_logged(d) -> int:
        return sum(
            1
            for e in d.log_events()
            if e["logger"] == "xrwatch.serve.pipeline" and ".png: " in e["message"]
        )

    names: list[str] = []
    # Which daemon wins each claim depends on scheduling: on a busy machine one daemon can
    # win a whole burst. Burst again (up to 4 times) until both have worked, so the
    # exactly-once check below really covers two competing daemons.
    for burst in range(4):
        for i in range(100):
            names.append(f"two/{burst}-{i:03d}.png")
            make_png(incoming / names[-1], seed=9000 + 100 * burst + i, size=16)
        wait_for(lambda: len(csv_rows(reports)) >= len(names), 180, f"{len(names)} rows")
        if all(predictions_logged(d) > 0 for d in (a, b)):
            break
    time.sleep(1.5)  # a rescan by both has happened: still nothing twice
    assert a.stop() == 0 and b.stop() == 0
    rows = assert_csv_intact(reports)
    counts = Counter(r["file"] for r in rows)
    assert sorted(counts) == sorted(names)
    assert max(counts.values()) == 1
    # both really worked on the folder (each logged predictions of its own)
    per_daemon = [predictions_logged(x) for x in (a, b)]
    assert sum(per_daemon) == len(names)
    assert all(k > 0 for k in per_daemon), per_daemon


def test_sigterm_mid_batch_finishes_the_batch_and_exits_0(folders, daemons) -> None:
    incoming, reports = folders
    # a batch waits up to 10 min for 64 files: the files below sit in a batch in flight,
    # and shutdown must commit it rather than wait
    d = daemons(incoming, reports, "--batch-size", "64", "--max-wait", "600").start()
    for i in range(5):
        make_png(incoming / f"t{i}.png", seed=i)
    make_png(incoming / "sub" / "later.png", seed=77)
    wait_for(lambda: _ledger_states(reports / "state")["claimed"] == 6, 60, "6 claimed files")
    assert csv_rows(reports) == []  # nothing reported yet: the batch is in flight
    d.signal(signal.SIGTERM)
    d.signal(signal.SIGTERM)  # a second signal must not interrupt the shutdown
    assert d.wait(120) == 0
    rows = assert_csv_intact(reports)
    assert sorted(r["file"] for r in rows) == ["sub/later.png", *(f"t{i}.png" for i in range(5))]
    assert {r["status"] for r in rows} == {"ok"}
    assert _ledger_states(reports / "state") == Counter({"ok": 6})
    assert any("STOPPING=1" in m for m in d.messages)


def test_sigint_also_stops_cleanly(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports).start()
    make_png(incoming / "a.png", seed=1)
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "one row")
    d.signal(signal.SIGINT)
    assert d.wait(60) == 0


def _finished_ledger(tmp_path: Path, n: int) -> Ledger:
    ledger = Ledger(tmp_path / "state")
    ledger.register(tmp_path)
    outcomes = []
    for i in range(n):
        row_id = ledger.claim(f"f{i}.png", f"sha{i}", f"sha{i}", 10, 1, time.time())
        assert row_id is not None
        record = {"file": f"f{i}.png", "sha256": f"sha{i}", "status": "ok", "label": "A",
                  "confidence": 0.9, "probabilities": {"A": 0.9, "B": 0.1}}  # fmt: skip
        outcomes.append((row_id, "ok", record))
    ledger.finish(outcomes)
    return ledger


def test_append_torn_by_a_killed_writer_is_undone_and_written_once(tmp_path: Path) -> None:
    """Simulate a writer killed after marking rows and writing half a line."""
    reports = tmp_path / "reports"
    ledger = _finished_ledger(tmp_path, 3)
    writer = ReportWriter(reports, ["A", "B"])
    writer.check_writable()
    assert len(writer.flush(ledger)) == 3
    # three more finished rows; a writer marks them and dies mid-line
    more = []
    for i in range(3, 6):
        row_id = ledger.claim(f"f{i}.png", f"sha{i}", f"sha{i}", 10, 1, time.time())
        assert row_id is not None
        more.append((row_id, "ok", {"file": f"f{i}.png", "sha256": f"sha{i}", "status": "ok"}))
    ledger.finish(more)
    csv_path = reports / "predictions.csv"
    offset = csv_path.stat().st_size
    ledger.mark_reporting([m[0] for m in more], str(csv_path), offset)
    with csv_path.open("ab") as fh:
        fh.write(b"2026-01-01T00:00:00Z,f3.png,sha3,ok,A,0.9")  # torn: no newline
    # the next writer (e.g. after restart) repairs and writes each row once
    writer2 = ReportWriter(reports, ["A", "B"])
    assert len(writer2.flush(ledger)) == 3
    rows = assert_csv_intact(reports)
    assert [r["file"] for r in rows] == [f"f{i}.png" for i in range(6)]
    assert writer2.flush(ledger) == []
    # JSON files exist for all, written atomically
    for i in range(6):
        assert json.loads((reports / "json" / f"f{i}.png.json").read_text())["file"] == f"f{i}.png"
    ledger.close()


def test_torn_tail_from_outside_is_dropped(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    ledger = _finished_ledger(tmp_path, 2)
    writer = ReportWriter(reports, ["A", "B"])
    writer.flush(ledger)
    with (reports / "predictions.csv").open("ab") as fh:
        fh.write(b"half a li")
    _ = ledger.claim("late.png", "x", "x", 1, 1, time.time())
    ledger.finish([(3, "ok", {"file": "late.png", "sha256": "x", "status": "ok"})])
    writer.flush(ledger)
    assert [r["file"] for r in assert_csv_intact(reports)] == ["f0.png", "f1.png", "late.png"]
    ledger.close()


def test_claim_is_exclusive_and_a_dead_owner_is_taken_over(tmp_path: Path) -> None:
    a = Ledger(tmp_path / "state")
    b = Ledger(tmp_path / "state")
    a.register(tmp_path)
    b.register(tmp_path)
    row = a.claim("x.png", "h", "h", 1, 1, time.time())
    assert row is not None
    assert b.claim("x.png", "h", "h", 1, 1, time.time()) is None  # held by a live daemon
    # a dies without unregistering: its heartbeat row names a pid that no longer exists
    con = sqlite3.connect(tmp_path / "state" / "ledger.sqlite3")
    con.execute("UPDATE daemons SET pid=? WHERE owner=?", (2**22 + 12345, a.owner))
    con.commit()
    con.close()
    assert b.claim("x.png", "h", "h", 1, 1, time.time()) == row
    b.finish([(row, "ok", {"file": "x.png"})])
    assert b.claim("x.png", "h", "h", 1, 1, time.time()) is None  # finished: never again
    assert b.claim("x.png", "other-content", "o", 1, 2, time.time()) is not None
    a.close()
    b.close()


def test_report_write_failure_is_logged_and_retried_without_losing_files(folders, daemons) -> None:
    """The CSV cannot be written for a while (here a folder sits where it should be; as
    root, permissions would not stop the daemon): outcomes wait in the ledger."""
    incoming, reports = folders
    d = daemons(incoming, reports).start()
    make_png(incoming / "first.png", seed=1)
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "first row")
    csv_path = reports / "predictions.csv"
    saved = csv_path.read_bytes()
    csv_path.unlink()
    csv_path.mkdir()  # appends now fail with IsADirectoryError
    for i in range(3):
        make_png(incoming / f"during{i}.png", seed=10 + i)
    wait_for(lambda: _ledger_states(reports / "state")["ok"] == 4, 60, "outcomes in the ledger")
    wait_for(lambda: any("cannot write reports" in e["message"] for e in d.log_events()), 30,
             "the report error in the log")  # fmt: skip
    assert d.proc is not None and d.proc.poll() is None  # still running
    csv_path.rmdir()
    csv_path.write_bytes(saved)  # the problem is fixed: the retry writes the waiting rows
    wait_for(lambda: len(csv_rows(reports)) == 4, 60, "the rows that waited")
    assert d.stop() == 0
    rows = assert_csv_intact(reports)
    assert sorted(r["file"] for r in rows) == ["during0.png", "during1.png", "during2.png",
                                               "first.png"]  # fmt: skip


def test_a_model_with_other_classes_starts_a_new_csv(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    ledger = _finished_ledger(tmp_path, 2)
    ReportWriter(reports, ["A", "B"]).flush(ledger)
    _ = ledger.claim("new.png", "n", "n", 1, 1, time.time())
    ledger.finish([(3, "ok", {"file": "new.png", "sha256": "n", "status": "ok",
                              "probabilities": {"A": 0.2, "B": 0.3, "C": 0.5}})])  # fmt: skip
    ReportWriter(reports, ["A", "B", "C"]).flush(ledger)
    old = (reports / "predictions.1.csv").read_text().splitlines()
    new = assert_csv_intact(reports)
    assert len(old) == 3 and "prob_C" not in old[0]
    assert [r["file"] for r in new] == ["new.png"] and new[0]["prob_C"] == "0.500000"
    ledger.close()
