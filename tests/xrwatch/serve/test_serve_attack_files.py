"""What a writer to INCOMING can do to the files themselves: swap a folder for a link to
the outside, replace a file just before it is archived or with the same size and mtime,
write it in pieces, make it sparse and huge, bring old content back. Each file still gets
exactly one truthful outcome, and nothing outside INCOMING is read or moved."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sqlite3
import time
from pathlib import Path

import numpy as np
from PIL import Image
from serve_harness import assert_csv_intact, csv_rows, make_png, png_bytes, wait_for

from tests.helpers.dicom_factory import gradient, write_dicom


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str:
    return _sha(path.read_bytes())


def test_parent_folder_swapped_for_a_link_to_outside_is_never_followed(
    folders, daemons, tmp_path: Path
) -> None:
    incoming, reports = folders
    archive = tmp_path / "archive"
    outside = tmp_path / "outside"
    outside.mkdir()
    d = daemons(incoming, reports, "--archive", str(archive), "--stable-seconds", "1.5").start()
    secrets = {}
    for attempt in range(2):
        s = incoming / f"s{attempt}"
        s.mkdir()
        inside, secret = _stored_png(attempt), _stored_png(100 + attempt)
        (outside / f"x{attempt}.png").write_bytes(secret)  # same size as the one inside
        secrets[attempt] = _sha(secret)
        fh = (s / f"x{attempt}.png").open("wb")  # written, not closed before the swap
        fh.write(inside)
        fh.flush()
        for path in (s / f"x{attempt}.png", outside / f"x{attempt}.png"):
            os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
        os.rename(s, incoming / f".old{attempt}")  # hidden: ignored
        s.symlink_to(outside, target_is_directory=True)
        fh.close()
    make_png(incoming / "after.png", seed=50)
    wait_for(lambda: any(r["file"] == "after.png" for r in csv_rows(reports)), 60, "after.png")
    wait_for(lambda: len(csv_rows(reports)) >= 3, 60, "rows for the links")
    time.sleep(2.0)  # the files found before the swaps are due by now
    assert d.stop() == 0
    rows = assert_csv_intact(reports)
    assert not set(secrets.values()) & {r["sha256"] for r in rows}, "read outside INCOMING"
    for attempt, secret in secrets.items():
        assert _file_sha(outside / f"x{attempt}.png") == secret, "moved from outside INCOMING"
    by_file = {r["file"]: r for r in rows}
    for attempt in range(2):
        # the link itself is the only file there: one error row, and the link is archived
        assert "points outside INCOMING" in by_file[f"s{attempt}"]["error"]
        assert not any(f.startswith(f"s{attempt}/") for f in by_file), sorted(by_file)
        assert (archive / "failed" / f"s{attempt}").is_symlink()
    archived = [p for p in archive.rglob("*") if p.is_file() and not p.is_symlink()]
    assert [p.relative_to(archive).as_posix() for p in archived] == ["processed/after.png"]


def test_archive_moves_only_the_content_that_was_classified(
    folders, daemons, tmp_path: Path
) -> None:
    incoming, reports = folders
    archive = tmp_path / "archive"
    d = daemons(incoming, reports, "--archive", str(archive), "--truncated-timeout", "60").start()
    csv_path = reports / "predictions.csv"
    make_png(incoming / "warmup.png", seed=1)
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "first row")
    saved = csv_path.read_bytes()
    csv_path.unlink()
    csv_path.mkdir()  # reports fail for a while, so the archive step waits
    first = png_bytes(seed=2)
    (incoming / "scan.png").write_bytes(first)
    con = sqlite3.connect(reports / "state" / "ledger.sqlite3", timeout=30)
    try:
        wait_for(lambda: con.execute("SELECT COUNT(*) FROM files WHERE state='ok'").fetchone()[0]
                 == 2, 60, "scan.png classified")  # fmt: skip
    finally:
        con.close()
    # another image renamed in under the same name; not complete yet, so not classified
    second = png_bytes(seed=3, size=64)
    (incoming / ".tmp-scan").write_bytes(second[: len(second) // 2])
    os.rename(incoming / ".tmp-scan", incoming / "scan.png")
    wait_for(lambda: any("waiting for the rest" in e["message"] for e in d.log_events()), 60,
             "the second one waited for")  # fmt: skip
    csv_path.rmdir()
    csv_path.write_bytes(saved)  # reports work again: rows, then the archive step
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "the row of the first")
    time.sleep(2.0)  # the archive step is done by now
    (incoming / ".tmp-scan").write_bytes(second)  # the second one, complete
    os.rename(incoming / ".tmp-scan", incoming / "scan.png")
    wait_for(lambda: len(csv_rows(reports)) == 3, 60, "a row for the second")
    wait_for(lambda: not (incoming / "scan.png").exists(), 60, "the second one archived")
    assert d.stop() == 0
    rows = assert_csv_intact(reports)
    assert [r["sha256"] for r in rows if r["file"] == "scan.png"] == [_sha(first), _sha(second)]
    archived = {_file_sha(p) for p in (archive / "processed").rglob("*.png")}
    assert archived <= {r["sha256"] for r in rows}, "archived something never classified"
    assert _sha(second) in archived


def _stored_png(seed: int) -> bytes:
    """An uncompressed PNG: the same size for every seed."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(
        buf, format="PNG", compress_level=0
    )
    return buf.getvalue()


def test_replacement_with_same_size_and_mtime_is_processed_at_restart(folders, daemons) -> None:
    incoming, reports = folders
    a, b = _stored_png(1), _stored_png(2)
    assert len(a) == len(b) and a != b
    target = incoming / "scan.png"
    target.write_bytes(a)
    d = daemons(incoming, reports).start()
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "first row")
    assert d.stop() == 0
    st = target.stat()
    tmp = incoming / ".cp-p"
    tmp.write_bytes(b)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # cp -p / rsync keep the mtime
    os.rename(tmp, target)
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    d2 = daemons(incoming, reports, "--rescan-interval", "0.3").start()
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "the replacement processed")
    assert d2.stop() == 0
    assert [r["sha256"] for r in assert_csv_intact(reports)] == [_sha(a), _sha(b)]


def test_files_written_in_pieces_get_one_outcome(folders, daemons, tmp_path: Path) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports, "--truncated-timeout", "60").start()
    write_dicom(tmp_path / "full.dcm", pixels=gradient(32, 32))
    dicom = (tmp_path / "full.dcm").read_bytes()
    png = png_bytes(seed=1)
    (incoming / "head.dcm").write_bytes(dicom[:100])  # a DICOM head, closed
    (incoming / "sig.png").write_bytes(png[:8])  # just the PNG signature, closed
    (incoming / "ihdr.png").write_bytes(png[:35])  # the signature and the header chunk
    (incoming / "empty.png").write_bytes(b"")  # created, filled later
    wait_for(lambda: sum("waiting for the rest" in e["message"] for e in d.log_events()) >= 4,
             60, "the four waits logged")  # fmt: skip
    time.sleep(1.0)
    (incoming / "head.dcm").write_bytes(dicom)
    (incoming / "sig.png").write_bytes(png)
    (incoming / "ihdr.png").write_bytes(png)
    (incoming / "empty.png").write_bytes(png_bytes(seed=2))
    wait_for(lambda: len(csv_rows(reports)) >= 4, 60, "four rows")
    time.sleep(1.0)
    assert d.stop() == 0
    rows = assert_csv_intact(reports)
    assert sorted((r["file"], r["status"]) for r in rows) == [
        ("empty.png", "ok"),
        ("head.dcm", "ok"),
        ("ihdr.png", "ok"),
        ("sig.png", "ok"),
    ]


def test_sparse_huge_files_are_refused_unread(folders, daemons) -> None:
    incoming, reports = folders
    for name in ("hole1.dcm", "hole2.dcm"):
        with (incoming / name).open("wb") as fh:
            fh.truncate(16 << 30)  # truncate -s 16G: no blocks, 16 GiB to read
    with (incoming / "two_mib.png").open("wb") as fh:
        fh.truncate(2 << 20)
    d = daemons(incoming, reports, "--workers", "1").start()
    make_png(incoming / "good.png", seed=1)
    wait_for(lambda: len(csv_rows(reports)) == 4, 60, "four rows")
    assert d.stop() == 0
    rows = {r["file"]: r for r in assert_csv_intact(reports)}
    assert rows["good.png"]["status"] == "ok"
    for name in ("hole1.dcm", "hole2.dcm"):
        assert rows[name]["status"] == "error"
        assert "over the 256 MiB limit" in rows[name]["error"], rows[name]
        assert rows[name]["sha256"] == ""  # never read, so never hashed
    assert "over the" not in rows["two_mib.png"]["error"]
    # the limit is a setting
    d2 = daemons(incoming, reports, "--max-file-mb", "1").start()
    (incoming / "two_mib.png").unlink()
    with (incoming / "two_mib_again.png").open("wb") as fh:
        fh.truncate(2 << 20)
    wait_for(lambda: len(csv_rows(reports)) == 5, 60, "a fifth row")
    assert d2.stop() == 0
    last = assert_csv_intact(reports)[-1]
    assert last["file"] == "two_mib_again.png" and "over the 1 MiB limit" in last["error"]


def test_old_content_back_under_its_name_is_what_the_json_says(folders, daemons) -> None:
    incoming, reports = folders
    d = daemons(incoming, reports).start()
    a, b = png_bytes(seed=1), png_bytes(seed=2)
    target = incoming / "scan.png"
    report = reports / "json" / "scan.png.json"
    for n, data in enumerate((a, b), start=1):
        target.write_bytes(data)
        wait_for(lambda n=n: len(csv_rows(reports)) == n, 60, f"row {n}")  # type: ignore[misc]
    assert json.loads(report.read_text())["sha256"] == _sha(b)
    target.write_bytes(a)  # A again
    wait_for(lambda: json.loads(report.read_text())["sha256"] == _sha(a), 60, "the JSON of A")
    target.write_bytes(b)  # and B again
    wait_for(lambda: json.loads(report.read_text())["sha256"] == _sha(b), 60, "the JSON of B")
    assert d.stop() == 0
    assert len(assert_csv_intact(reports)) == 2  # one row per content


def test_a_dead_daemon_whose_pid_is_reused_does_not_hold_its_files(folders, daemons) -> None:
    """In a container the restarted daemon usually gets the pid of the one that died."""
    incoming, reports = folders
    d = daemons(incoming, reports).start()
    assert d.proc is not None
    data = png_bytes(seed=1)
    con = sqlite3.connect(reports / "state" / "ledger.sqlite3", timeout=30)
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        now = time.time()
        dead = f"{socket.gethostname()}:{d.proc.pid}:deadbeef"
        columns = {r[1] for r in con.execute("PRAGMA table_info(daemons)")}
        start = {"proc_start": f"{boot}:1"} if "proc_start" in columns else {}
        values = {"owner": dead, "host": socket.gethostname(), "pid": d.proc.pid, **start,
                  "started_at": now, "heartbeat_at": now, "incoming": str(incoming)}  # fmt: skip
        con.execute(
            f"INSERT INTO daemons ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
            tuple(values.values()),
        )
        con.execute(
            "INSERT INTO files (path, identity, sha256, size, mtime_ns, state, owner, seen_at, "
            "claimed_at) VALUES ('scan.png', ?, ?, 1, 1, 'claimed', ?, ?, ?)",
            (_sha(data), _sha(data), dead, now, now),
        )
        con.commit()
    finally:
        con.close()
    (incoming / "scan.png").write_bytes(data)
    wait_for(lambda: len(csv_rows(reports)) == 1, 60, "the file the dead daemon had claimed")
    assert d.stop() == 0
    assert assert_csv_intact(reports)[0]["status"] == "ok"


def test_rows_from_before_ctime_and_inode_were_recorded_are_not_reported_again(
    folders, daemons
) -> None:
    """A ledger written by an older version has no ctime/inode: the first start reads and
    hashes those files once more, finds their content finished, and reports nothing."""
    incoming, reports = folders
    for i in range(3):
        make_png(incoming / f"f{i}.png", seed=i)
    d = daemons(incoming, reports).start()
    wait_for(lambda: len(csv_rows(reports)) == 3, 60, "three rows")
    assert d.stop() == 0
    con = sqlite3.connect(reports / "state" / "ledger.sqlite3", timeout=30)
    try:
        con.execute("UPDATE files SET ctime_ns=NULL, inode=NULL")
        con.commit()

        def unrecorded() -> int:
            return int(con.execute("SELECT COUNT(*) FROM files WHERE inode IS NULL").fetchone()[0])

        d2 = daemons(incoming, reports).start()
        # seen again: their stat is recorded now, so the next scans skip them unread
        wait_for(lambda: unrecorded() == 0, 60, "the files seen again")
    finally:
        con.close()
    make_png(incoming / "new.png", seed=9)
    wait_for(lambda: len(csv_rows(reports)) == 4, 60, "the new file's row")
    assert d2.stop() == 0
    assert sorted(r["file"] for r in assert_csv_intact(reports)) == [
        "f0.png", "f1.png", "f2.png", "new.png",
    ]  # fmt: skip
