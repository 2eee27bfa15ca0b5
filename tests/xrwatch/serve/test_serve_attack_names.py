"""Names and trees an attacker (or an old SMB client) can put in INCOMING: non-UTF-8 and
line-break names, folders a thousand levels deep. None may stop the daemon, and each file
gets exactly one row under a name that says which file it was."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from serve_harness import assert_csv_intact, csv_rows, make_png, png_bytes, wait_for

from xrwatch.serve.watcher import MAX_DEPTH


def _write_raw(folder: Path, raw_name: bytes, data: bytes) -> None:
    with open(os.path.join(os.fsencode(folder), raw_name), "wb") as fh:
        fh.write(data)


def test_non_utf8_names_are_reported_escaped_and_never_stop_the_daemon(folders, daemons) -> None:
    incoming, reports = folders
    _write_raw(incoming, b"M\xfcller.png", png_bytes(seed=1))  # Latin-1, in the backlog
    (incoming / "sub").mkdir()
    _write_raw(incoming / "sub", b"\xe9t\xe9.png", b"not an image at all, just text")
    d = daemons(incoming, reports).start()
    wait_for(lambda: len(csv_rows(reports)) == 2, 60, "rows for the backlog")
    _write_raw(incoming, b"Gr\xf6\xdfe.png", png_bytes(seed=2))  # while watching
    make_png(incoming / "plain.png", seed=3)
    wait_for(lambda: len(csv_rows(reports)) == 4, 60, "rows for the new files")
    assert d.stop() == 0
    rows = {r["file"]: r for r in assert_csv_intact(reports)}
    expected = ["Gr\\xf6\\xdfe.png", "M\\xfcller.png", "plain.png", "sub/\\xe9t\\xe9.png"]
    assert sorted(rows) == expected
    assert rows["M\\xfcller.png"]["status"] == "ok"
    assert rows["sub/\\xe9t\\xe9.png"]["status"] == "error"
    assert json.loads((reports / "json" / "M\\xfcller.png.json").read_text())["status"] == "ok"
    # the start-up scan of a restart meets the same names: no crash, nothing twice
    d2 = daemons(incoming, reports, "--rescan-interval", "0.3").start()
    make_png(incoming / "after.png", seed=4)
    wait_for(lambda: len(csv_rows(reports)) == 5, 60, "a row after the restart")
    assert d2.stop() == 0
    assert len(assert_csv_intact(reports)) == 5


def test_line_breaks_in_names_are_escaped_and_never_collide(folders, daemons) -> None:
    incoming, reports = folders
    make_png(incoming / "a\nb.png", seed=1)
    make_png(incoming / "a b.png", seed=2)
    make_png(incoming / "a\\nb.png", seed=3)  # a real backslash-n: a third, distinct name
    make_png(incoming / "c\r.png", seed=4)
    d = daemons(incoming, reports).start()
    wait_for(lambda: len(csv_rows(reports)) == 4, 60, "four rows")
    assert d.stop() == 0
    rows = {r["file"]: r for r in assert_csv_intact(reports)}
    assert sorted(rows) == ["a b.png", "a\\\\nb.png", "a\\nb.png", "c\\r.png"]
    assert len({r["sha256"] for r in rows.values()}) == 4
    for name in rows:
        assert (reports / "json" / f"{name}.json").is_file(), name


_OBSERVER_ARGS = {"inotify": (), "poll": ("--poll", "--poll-interval", "0.2")}


def _make_deep(top: Path, levels: int) -> None:
    """``top/d/d/.../d`` ``levels`` deep, a file at depth 2 and one at the bottom."""
    top.mkdir(parents=True)
    make_png(top / "shallow.png", seed=1)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("bottom.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(png_bytes(seed=2))
    finally:
        os.close(fd)


def _remove_deep(top: Path) -> None:
    """``rm -r`` without recursion (shutil.rmtree recurses once per level)."""
    for root, dirs, files in _walk_bottom_up(top):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    top.rmdir()


def _walk_bottom_up(top: Path) -> list[tuple[str, list[str], list[str]]]:
    out = []
    stack = [str(top)]
    while stack:
        root = stack.pop()
        entries = list(os.scandir(root))
        dirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        out.append((root, dirs, [e.name for e in entries if e.name not in dirs]))
        stack.extend(os.path.join(root, d) for d in dirs)
    return out[::-1]


def _check_deep_rows(reports: Path, prefix: str) -> None:
    rows = {r["file"]: r for r in assert_csv_intact(reports)}
    assert rows[f"{prefix}shallow.png"]["status"] == "ok"
    too_deep = [r for r in rows.values() if "nested more than" in r["error"]]
    assert len(too_deep) == 1, sorted(rows)
    assert too_deep[0]["file"] == prefix + "/".join(["d"] * (MAX_DEPTH + 1 - prefix.count("/")))
    assert not any(name.endswith("bottom.png") for name in rows)


@pytest.mark.parametrize("observer", ["inotify", "poll"])
def test_deep_tree_present_at_start(folders, daemons, observer: str) -> None:
    incoming, reports = folders
    _make_deep(incoming / "t", 1000)
    try:
        d = daemons(incoming, reports, *_OBSERVER_ARGS[observer]).start()
        wait_for(lambda: len(csv_rows(reports)) == 2, 60, "two rows")
        make_png(incoming / "later.png", seed=3)  # the watch is alive
        wait_for(lambda: len(csv_rows(reports)) == 3, 60, "a row for a later file")
        assert d.stop() == 0
        _check_deep_rows(reports, "t/")
    finally:
        _remove_deep(incoming / "t")


@pytest.mark.parametrize("observer", ["inotify", "poll"])
def test_deep_tree_moved_in(folders, daemons, tmp_path: Path, observer: str) -> None:
    incoming, reports = folders
    _make_deep(tmp_path / "built", 1000)
    d = daemons(incoming, reports, *_OBSERVER_ARGS[observer]).start()
    try:
        os.rename(tmp_path / "built", incoming / "t")
        wait_for(lambda: len(csv_rows(reports)) == 2, 60, "two rows")
        make_png(incoming / "later.png", seed=3)  # the watch is alive
        wait_for(lambda: len(csv_rows(reports)) == 3, 60, "a row for a later file")
        assert d.stop() == 0
        _check_deep_rows(reports, "t/")
        assert not any(e["level"] == "critical" for e in d.log_events())
    finally:
        _remove_deep(incoming / "t")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failed_watch_starts_leak_no_descriptors(tmp_path: Path, monkeypatch) -> None:
    """A watch that cannot start (here: adding the inotify watches raises, as a deep tree
    did) is retried on every rescan; each try must give its inotify descriptors back.

    On a busy machine the inotify reader thread may not have run at all when the failed
    watch is stopped; that interleaving (which leaked three descriptors a try) is forced
    here on every try, so the result does not depend on how busy the machine is."""
    from watchdog.observers.inotify import InotifyWatchGroup
    from watchdog.observers.inotify_c import InotifyFD

    from xrwatch.serve.stability import StabilityTracker
    from xrwatch.serve.watcher import FolderWatcher

    def refuse(self: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    real_run = InotifyFD.run

    def run_once_stopped(self: InotifyFD) -> None:
        assert self.stopped_event.wait(30), "the failed watch was never stopped"
        real_run(self)

    monkeypatch.setattr(InotifyWatchGroup, "_activate", refuse)
    monkeypatch.setattr(InotifyFD, "run", run_once_stopped)
    watcher = FolderWatcher(tmp_path, StabilityTracker(0.3), ignore=())
    counts = []
    try:
        for _ in range(4):
            try:
                watcher.start()
            except RecursionError:
                pass
            watcher.ensure_alive()  # the daemon's rescan: logs the failure, tries again
            counts.append(_open_fds())
    finally:
        watcher.stop()
    assert counts[-1] <= counts[0], counts
    assert not watcher.alive()
    assert not [t for t in threading.enumerate() if isinstance(t, InotifyFD)]


def test_observer_thread_death_is_loud_and_the_watch_restarts(
    folders, tiny_onnx_model: Path, monkeypatch, caplog
) -> None:
    """The thread that reads inotify events dies of an exception (here injected into the
    handling of a new folder): logged at CRITICAL, and the watch is started again, so that
    later files are found by events (the rescan interval is far longer than the test)."""
    from xrwatch.serve.config import ServeConfig
    from xrwatch.serve.daemon import Daemon
    from xrwatch.serve.observers import _WatchGroup

    incoming, reports = folders
    calls: list[bytes] = []
    original = _WatchGroup._recursive_simulate

    def fail_once(self: _WatchGroup, src_path: bytes) -> list:  # type: ignore[type-arg]
        calls.append(src_path)
        if len(calls) == 1:
            raise RuntimeError("injected: the event reader fails")
        return original(self, src_path)

    monkeypatch.setattr(_WatchGroup, "_recursive_simulate", fail_once)
    config = ServeConfig(
        incoming, tiny_onnx_model, reports, stable_seconds=0.2, max_wait=0.05,
        rescan_interval=600,
    )  # fmt: skip
    daemon = Daemon(config)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(daemon.run()))
    runner.start()
    try:
        wait_for(daemon.ready.is_set, 60, "the daemon to be ready")
        (incoming / "sub").mkdir()  # the reader thread dies handling this
        wait_for(lambda: any(r.levelname == "CRITICAL" and "died" in r.getMessage()
                             for r in caplog.records), 30, "the death logged")  # fmt: skip
        wait_for(lambda: any("starting it again" in r.getMessage() for r in caplog.records),
                 30, "the watch restarted")  # fmt: skip
        make_png(incoming / "sub" / "later.png", seed=1)
        wait_for(lambda: len(csv_rows(reports)) == 1, 60, "a file found by the new watch")
    finally:
        daemon.request_stop()
        runner.join(30)
    assert result == [0]


def test_escaped_names_are_plain_text_and_never_collide() -> None:
    from xrwatch.serve.names import escape_name

    rng = np.random.default_rng(0)
    alphabet = [b"a", b".", b"\\", b"n", b"x", b"f", b"c", b"\n", b"\r", b"\t", b"\x1b",
                b"\xfc", b"\xc3\xbc", b"\xc2\x85", b"\xe2\x80\xa8", b"\x7f", b" "]  # fmt: skip
    names = {b"".join(rng.choice(alphabet, size=rng.integers(1, 6))) for _ in range(20_000)}
    escaped = {escape_name(os.fsdecode(n)) for n in names}
    assert len(escaped) == len(names)  # injective
    for text in escaped:
        text.encode("utf-8")  # storable in SQLite, CSV and JSON
        assert text.isprintable(), text
    assert escape_name("Müller.png") == "Müller.png"
    assert escape_name(os.fsdecode(b"M\xfcller.png")) == "M\\xfcller.png"
