"""How files arrive: backlog, slow chunked copies, rename from a temporary name, bursts,
subfolders, and the polling observer. Real daemons on real folders."""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter

from serve_harness import assert_csv_intact, csv_rows, make_png, png_bytes, wait_for


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_backlog_at_start_then_new_files(folders, daemons) -> None:
    incoming, reports = folders
    for i in range(6):
        make_png(incoming / f"old{i}.png", seed=i)
    make_png(incoming / "study" / "series" / "deep.png", seed=99)
    d = daemons(incoming, reports).start()
    wait_for(lambda: len(csv_rows(reports)) == 7, 60, "7 backlog rows")
    make_png(incoming / "new.png", seed=100)
    wait_for(lambda: len(csv_rows(reports)) == 8, 60, "the new file's row")
    assert d.stop() == 0
    rows = assert_csv_intact(reports)
    assert sorted(r["file"] for r in rows) == sorted(
        [*(f"old{i}.png" for i in range(6)), "study/series/deep.png", "new.png"]
    )
    assert {r["status"] for r in rows} == {"ok"}
    # the start-up log names the provider actually used
    assert any("CPUExecutionProvider" in e["message"] for e in d.log_events())


def test_slow_chunked_copy_is_processed_once_after_it_completes(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports).start()
    data = png_bytes(seed=7, size=300)  # noise: ~90 kB, mostly one IDAT chunk
    quarter = len(data) // 4
    # 1) one writer, file kept open, pauses shorter than the stability wait
    with (incoming / "open_copy.png").open("wb") as fh:
        for k in range(4):
            fh.write(data[k * quarter : (k + 1) * quarter if k < 3 else len(data)])
            fh.flush()
            time.sleep(0.15)
    # 2) a copy that closes and reopens between chunks, pausing longer than the
    #    stability wait: every partial state is a truncated PNG and must be waited for
    target = incoming / "reopened_copy.png"
    for k in range(4):
        with target.open("ab") as fh:
            fh.write(data[k * quarter : (k + 1) * quarter if k < 3 else len(data)])
        time.sleep(0.8)
    wait_for(lambda: len(csv_rows(reports)) >= 2, 60, "two rows")
    time.sleep(1.0)  # any duplicate would show up now
    assert d.stop() == 0
    rows = assert_csv_intact(reports)
    assert Counter(r["file"] for r in rows) == {"open_copy.png": 1, "reopened_copy.png": 1}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["sha256"] == _sha(data)  # the complete file, not a prefix
    events = d.log_events()
    assert any("incomplete" in e["message"] for e in events)
    # a file waited for is logged once at INFO, not at every retry
    for name in ("open_copy.png", "reopened_copy.png"):
        info = [
            e
            for e in events
            if e["level"] == "info" and "incomplete" in e["message"] and name in e["message"]
        ]
        assert len(info) <= 1, info


def test_rename_from_temporary_name_is_processed_once_under_final_name(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports).start()
    data = png_bytes(seed=3, size=64)
    for tmp_name, final in (
        ("scan1.png.part", "scan1.png"),
        (".scan2.png", "scan2.png"),
        ("scan3.tmp", "scan3.png"),
        ("~scan4.png", "scan4.png"),
        ("scan5.png.crdownload", "scan5.png"),
    ):
        tmp = incoming / tmp_name
        tmp.write_bytes(data[: len(data) // 2])
        time.sleep(0.5)  # longer than the stability wait: a temp name must never be taken
        with tmp.open("ab") as fh:
            fh.write(data[len(data) // 2 :])
        os.rename(tmp, incoming / final)
    (incoming / "DICOMDIR").write_bytes(b"\0" * 200)
    wait_for(lambda: len(csv_rows(reports)) >= 5, 60, "five rows")
    time.sleep(1.0)
    assert d.stop() == 0
    rows = assert_csv_intact(reports)
    assert sorted(r["file"] for r in rows) == [f"scan{i}.png" for i in range(1, 6)]
    assert {r["status"] for r in rows} == {"ok"}


def test_burst_of_500_files(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports, "--batch-size", "32").start()
    names = []
    for i in range(500):
        sub = f"burst{i % 5}"
        names.append(f"{sub}/img{i:03d}.png")
        make_png(incoming / names[-1], seed=1000 + i, size=16)
    wait_for(lambda: len(csv_rows(reports)) >= 500, 180, "500 rows")
    time.sleep(0.5)
    assert d.stop() == 0
    rows = assert_csv_intact(reports)
    assert sorted(r["file"] for r in rows) == sorted(names)
    assert {r["status"] for r in rows} == {"ok"}
    assert len({r["sha256"] for r in rows}) == 500
    assert len(list((reports / "json").rglob("*.json"))) == 500


def test_polling_observer_sees_new_files(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports, "--poll", "--rescan-interval", "600").start()
    make_png(incoming / "a.png", seed=1)
    (incoming / "sub").mkdir()
    make_png(incoming / "sub" / "b.png", seed=2)
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "two rows via polling")
    assert d.stop() == 0
    assert any("polling" in e["message"] for e in d.log_events())


def test_folder_moved_in_from_an_ignored_name(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports, "--rescan-interval", "600").start()
    hidden = incoming / ".staging"
    make_png(hidden / "x.png", seed=5)
    make_png(hidden / "y.png", seed=6)
    os.rename(hidden, incoming / "study42")
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "rows for a moved-in folder")
    assert d.stop() == 0
    assert sorted(r["file"] for r in csv_rows(reports)) == ["study42/x.png", "study42/y.png"]


def test_periodic_rescan_catches_files_no_event_reported(folders, daemons) -> None:
    """The polling observer, set to look only every 10 minutes, reports nothing during the
    test: the file is found by the periodic rescan alone."""
    incoming, reports = folders
    d = daemons(incoming, reports, "--poll", "--poll-interval", "600", "--rescan-interval", "1")
    d.start()
    make_png(incoming / "missed.png", seed=8)
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "the rescan to find the file")
    assert d.stop() == 0


def test_changed_content_is_processed_again_same_content_is_not(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports).start()
    target = incoming / "same_name.png"
    target.write_bytes(png_bytes(seed=1))
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "first row")
    os.utime(target)  # touched, same content: not processed again
    time.sleep(1.0)
    target.write_bytes(png_bytes(seed=2))  # new content: processed again
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "second row")
    time.sleep(1.0)
    assert d.stop() == 0
    rows = csv_rows(reports)
    assert [r["sha256"] for r in rows] == [_sha(png_bytes(seed=1)), _sha(png_bytes(seed=2))]


def test_restart_does_not_reprocess(folders, daemons) -> None:
    incoming, reports = folders
    for i in range(5):
        make_png(incoming / f"f{i}.png", seed=i)
    d = daemons(incoming, reports).start()
    wait_for(lambda: len(csv_rows(reports)) == 5, 60, "five rows")
    assert d.stop() == 0
    d2 = daemons(incoming, reports).start()
    time.sleep(1.0)
    assert d2.stop() == 0
    assert len(assert_csv_intact(reports)) == 5


def test_watch_restarts_after_incoming_is_removed_and_recreated(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports, "--rescan-interval", "0.5").start()
    make_png(incoming / "before.png", seed=1)
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "first row")
    os.unlink(incoming / "before.png")
    incoming.rmdir()  # e.g. a share unmounted...
    time.sleep(1.0)
    incoming.mkdir()  # ...and mounted again
    wait_for(lambda: any("starting it again" in e["message"] for e in d.log_events()),
             30, "the watch to restart")  # fmt: skip
    make_png(incoming / "after.png", seed=2)
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "a row after the remount")
    assert d.stop() == 0
