"""``replace_all``: a batch of files written atomically with one wait for the disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xrwatch import atomic
from xrwatch.atomic import replace_all


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What reaches the disk, in order: "f" per fsync, "r" per rename (both still happen)."""
    seen: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        seen.append("f")
        real_fsync(fd)

    def replace(src: str, dst: Path) -> None:
        seen.append("r")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def test_every_file_is_fsynced_before_any_is_renamed(tmp_path: Path, events: list[str]) -> None:
    targets = [tmp_path / f"{i}.png" for i in range(4)]
    targets[0].write_bytes(b"old")
    assert replace_all([(t, f"new {i}".encode()) for i, t in enumerate(targets)]) == [None] * 4
    assert "".join(events) == "ffffrrrr" + "f"  # the files, the renames, then the folder once
    assert [t.read_bytes() for t in targets] == [f"new {i}".encode() for i in range(4)]
    assert _leftovers(tmp_path) == []


def test_every_files_writeback_starts_before_the_first_fsync_and_a_refused_hint_is_harmless(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list[str]
) -> None:
    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        events.append("w")
        assert (offset, length, advice) == (0, 0, os.POSIX_FADV_DONTNEED)
        raise OSError(22, "Invalid argument")  # as on a file system that ignores the hint

    monkeypatch.setattr(os, "posix_fadvise", advise)
    targets = [tmp_path / f"{i}.png" for i in range(3)]
    assert replace_all([(t, b"png %d" % i) for i, t in enumerate(targets)]) == [None] * 3
    assert "".join(events) == "www" + "fff" + "rrr" + "f"
    assert [t.read_bytes() for t in targets] == [b"png %d" % i for i in range(3)]


def _content_of(fd: int) -> bytes:
    return Path(os.readlink(f"/proc/self/fd/{fd}")).read_bytes()


def test_one_failure_leaves_its_old_file_and_the_others_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok, full, onto_dir, missing = (
        tmp_path / "ok.png",
        tmp_path / "full.png",
        tmp_path / "dir.png",
        tmp_path / "no" / "such.png",
    )
    full.write_bytes(b"old")
    onto_dir.mkdir()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isfile(os.readlink(f"/proc/self/fd/{fd}")) and _content_of(fd) == b"for full":
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    files = [(ok, b"for ok"), (full, b"for full"), (onto_dir, b"for dir"), (missing, b"x")]
    results = replace_all(files, suffix=".png.tmp")
    assert results[0] is None and ok.read_bytes() == b"for ok"
    assert isinstance(results[1], OSError) and results[1].errno == 28
    assert full.read_bytes() == b"old"  # never replaced by bytes that did not reach the disk
    assert isinstance(results[2], IsADirectoryError) and onto_dir.is_dir()
    assert isinstance(results[3], FileNotFoundError) and not missing.exists()
    assert _leftovers(tmp_path) == []


def test_an_interrupt_removes_every_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        replace_all([(tmp_path / f"{i}.png", b"x") for i in range(3)])
    assert list(tmp_path.iterdir()) == []  # no target, no temporary file


def test_empty_batch_writes_nothing(tmp_path: Path) -> None:
    assert replace_all([]) == []
    assert list(tmp_path.iterdir()) == []


def test_a_large_batch_goes_in_groups_of_open_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list[str]
) -> None:
    monkeypatch.setattr(atomic, "MAX_OPEN", 3)
    files = [(tmp_path / f"{i}.json", str(i).encode()) for i in range(7)]
    files[4] = (tmp_path / "missing" / "4.json", b"4")
    results = replace_all(files)
    assert [r is None for r in results] == [True] * 4 + [False] + [True] * 2
    # each group: its files fsynced, renamed, then their folder fsynced
    assert "".join(events) == "fffrrrf" + "ffrrf" + "frf"
    assert [p.read_bytes() for p, _ in files if p.parent == tmp_path] == [
        b"0",
        b"1",
        b"2",
        b"3",
        b"5",
        b"6",
    ]
    assert _leftovers(tmp_path) == []


def test_a_folder_that_cannot_be_synced_fails_the_files_renamed_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    real = atomic.fsync_dir

    def fsync_dir(path: Path) -> None:
        if path.name == "b":
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(atomic, "fsync_dir", fsync_dir)
    files = [
        (tmp_path / "a" / "1", b"1"),
        (tmp_path / "b" / "2", b"2"),
        (tmp_path / "b" / "3", b"3"),
    ]
    results = replace_all(files)
    assert results[0] is None
    assert all(isinstance(r, OSError) and r.errno == 5 for r in results[1:])


def test_make_dirs_syncs_each_new_folders_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(atomic, "fsync_dir", synced.append)
    atomic.make_dirs(tmp_path / "x" / "y" / "z")
    assert (tmp_path / "x" / "y" / "z").is_dir()
    assert synced == [tmp_path, tmp_path / "x", tmp_path / "x" / "y"]
    synced.clear()
    atomic.make_dirs(tmp_path / "x" / "y")  # nothing new: nothing to sync
    assert synced == []


def test_make_dirs_names_the_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").write_text("a file where a folder should be")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'a' / 'b'} is not a folder"):
        atomic.make_dirs(tmp_path / "a" / "b" / "c" / "d")
    assert (tmp_path / "a" / "b").read_text() == "a file where a folder should be"


def test_write_atomic_makes_its_folder_and_replaces_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "new" / "report.json"
    atomic.write_atomic(target, b"first")
    atomic.write_atomic(target, b"second", suffix=".part")
    assert target.read_bytes() == b"second"
    assert _leftovers(tmp_path) == []
    with pytest.raises(IsADirectoryError):  # a folder where the file should be: raised
        atomic.write_atomic(tmp_path / "new", b"x")
    assert _leftovers(tmp_path) == []
