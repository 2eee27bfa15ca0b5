"""The receiver's input path, piece by piece: reading a PDU off the socket, the spool part
file's buffered writes, the per-association copy of the presentation contexts, and the folder
watch that reads of INCOMING do not wake."""

from __future__ import annotations

import copy
import hashlib
import socket
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.presentation import AllStoragePresentationContexts

from xrwatch.dicom import spool as spool_module
from xrwatch.dicom.gate import read_exactly
from xrwatch.dicom.pynetdicom_glue import SharedUIDContexts, decodable_transfer_syntaxes
from xrwatch.dicom.spool import PartFile, Spool


def _send_later(sock: socket.socket, chunks: list[bytes], close: bool) -> threading.Thread:
    def run() -> None:
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(0.01)  # separate segments: the reader must loop
        if close:
            sock.close()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_read_exactly_gathers_a_pdu_sent_in_pieces() -> None:
    a, b = socket.socketpair()
    with a, b:
        data = bytes(range(256)) * 1000  # 256,000 bytes
        t = _send_later(b, [data[:1000], data[1000:70000], data[70000:]], close=False)
        got = read_exactly(a, len(data))
        t.join()
        assert isinstance(got, bytearray)
        assert got == data


def test_read_exactly_returns_what_came_before_the_peer_closed() -> None:
    a, b = socket.socketpair()
    with a:
        t = _send_later(b, [b"x" * 5000], close=True)
        got = read_exactly(a, 10000)
        t.join()
        assert got == b"x" * 5000


def test_read_exactly_lets_a_timeout_through() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(0.05)
        with pytest.raises(TimeoutError):
            read_exactly(a, 10)


def _part(tmp_path: Path, limit: int = 1 << 30) -> tuple[PartFile, list[int]]:
    incoming = tmp_path / "in"
    incoming.mkdir()
    spool = Spool(incoming)
    spool.ensure()
    over: list[int] = []
    return PartFile(spool, limit, over.append), over


def test_part_file_gathers_pdus_and_writes_them_at_close(tmp_path: Path) -> None:
    part, _ = _part(tmp_path)
    pdus = [bytes([i]) * 16384 for i in range(10)]  # ten 16 KiB PDUs, as storescu sends
    for pdu in pdus:
        assert part.write(pdu) == len(pdu)
        part.file.flush()  # pynetdicom flushes after every fragment: nothing is written yet
    on_disk = Path(part.name)
    assert on_disk.stat().st_size == 0
    part.close()
    assert on_disk.read_bytes() == b"".join(pdus)
    assert part.sha256() == hashlib.sha256(b"".join(pdus)).hexdigest()
    part.discard()
    assert not on_disk.exists()


def test_part_file_writes_each_full_buffer_at_once(tmp_path: Path) -> None:
    part, _ = _part(tmp_path)
    chunk = b"a" * 65536
    n = spool_module.WRITE_BUFFER // len(chunk)
    for _ in range(n + 1):
        part.write(chunk)
    assert Path(part.name).stat().st_size == n * len(chunk)  # the full buffer, not the rest
    part.close()
    assert Path(part.name).stat().st_size == (n + 1) * len(chunk)
    part.discard()


def test_part_file_over_its_limit_is_removed_with_nothing_buffered(tmp_path: Path) -> None:
    part, over = _part(tmp_path, limit=100_000)
    part.write(b"b" * 60_000)
    part.write(b"b" * 60_000)
    assert over == [120_000]
    assert not Path(part.name).exists()
    assert part.write(b"c" * 10) == 10  # the rest of the data set goes nowhere
    part.close()
    assert not Path(part.name).exists()


def test_the_contexts_copied_per_association_are_new_objects_sharing_only_the_uids() -> None:
    ae = AE()
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, decodable_transfer_syntaxes())
    contexts = SharedUIDContexts(ae.supported_contexts)
    mine = copy.deepcopy(contexts)  # what pynetdicom does for each association
    theirs = copy.deepcopy(list(contexts))  # pynetdicom's own deep copy
    assert len(mine) == len(theirs) == len(contexts) > 100
    for new, reference, old in zip(mine, theirs, contexts, strict=True):
        assert vars(new) == vars(reference)
        assert new is not old
        assert new.transfer_syntax is not old.transfer_syntax  # negotiation may change it
        new.transfer_syntax.append("1.2.3")
        assert "1.2.3" not in old.transfer_syntax
        assert new.abstract_syntax is old.abstract_syntax  # not rebuilt: the cost it saves


def test_reading_files_in_incoming_wakes_no_watch_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xrwatch.serve import watcher as w

    seen: list[str] = []
    real = w._Handler.on_any_event

    def counting(self: w._Handler, event: object) -> None:
        seen.append(type(event).__name__)
        real(self, event)

    monkeypatch.setattr(w._Handler, "on_any_event", counting)

    class Tracker:
        def offer(self, path: Path, *, complete: bool = False) -> None: ...

        def forget(self, path: Path) -> None: ...

    root = tmp_path / "in"
    root.mkdir()
    fw = w.FolderWatcher(root, Tracker(), ignore=())  # type: ignore[arg-type]
    fw.start()
    try:
        (root / "a.dcm").write_bytes(b"x" * 1000)
        deadline = time.monotonic() + 30
        while "FileClosedEvent" not in seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "FileClosedEvent" in seen
        before = len(seen)
        for _ in range(20):
            (root / "a.dcm").read_bytes()
        (root / "b.dcm").write_bytes(b"y")  # a marker: its events come after the reads'
        while "FileClosedEvent" not in seen[before:] and time.monotonic() < deadline:
            time.sleep(0.02)
        after = seen[before:]
        assert "FileClosedEvent" in after
        assert not [e for e in after if e in ("FileOpenedEvent", "FileClosedNoWriteEvent")]
    finally:
        fw.stop()


def test_the_spool_parts_folder_is_not_watched_until_renamed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver streams data sets into the hidden ``INCOMING/dicom/.parts``: writing,
    closing and removing a part wakes no watch thread (no inotify watch there); only the
    rename into a series folder is an event, a move offered complete (taken at once, as a
    rename within the watch is). A hidden folder renamed to a visible name is watched from
    then on, and what it holds is offered."""
    from xrwatch.dicom.files import PART_SUFFIX
    from xrwatch.inputs import IGNORE_PATTERNS
    from xrwatch.serve import watcher as w

    seen: list[tuple[str, str]] = []
    real = w._Handler.on_any_event

    def counting(self: w._Handler, event: object) -> None:
        seen.append((type(event).__name__, str(getattr(event, "dest_path", "") or
                                               getattr(event, "src_path", ""))))  # fmt: skip
        real(self, event)

    monkeypatch.setattr(w._Handler, "on_any_event", counting)
    offered: list[Path] = []
    completed: list[Path] = []

    class Tracker:
        def offer(self, path: Path, *, complete: bool = False) -> None:
            offered.append(path)
            if complete:
                completed.append(path)

        def forget(self, path: Path) -> None: ...

    def wait(predicate: object, what: str) -> None:
        deadline = time.monotonic() + 30
        while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
            time.sleep(0.02)
        assert predicate(), what  # type: ignore[operator]

    root = tmp_path / "in"
    root.mkdir()
    spool = Spool(root)
    spool.ensure()  # INCOMING/dicom/.parts, before the watch starts
    fw = w.FolderWatcher(root, Tracker(), ignore=IGNORE_PATTERNS)  # type: ignore[arg-type]
    fw.start()
    try:
        marker = root / "marker.txt"  # the watch is added by its thread: wait until it is
        deadline = time.monotonic() + 30
        while not any(p == str(marker) for _, p in seen) and time.monotonic() < deadline:
            marker.write_bytes(b"m")
            time.sleep(0.05)
        late = root / "late" / ".hidden"  # a hidden folder made while the watch runs
        late.parent.mkdir()
        wait(lambda: any(p.endswith("/late") for _, p in seen), "the folder made later")
        late.mkdir()
        for _ in range(5):  # parts written, synced, removed: as the receiver does
            part = PartFile(spool, 1 << 30, lambda _n: None)
            part.write(b"x" * 1000)
            part.close()
            spool.discard(part.part)
        (late / "inside.dcm").write_bytes(b"z")
        kept = ""
        for n in (4, 5):  # the first makes the series folder; the second lands in it watched
            part = PartFile(spool, 1 << 30, lambda _n: None)
            part.write(b"y" * 1000)
            part.close()
            kept = str(root / spool.commit(part.part, "1.2", "1.2.3", f"1.2.3.{n}.dcm"))
            series = str(Path(kept).parent)
            wait(lambda: ("DirCreatedEvent", series) in seen, "the series folder")  # noqa: B023
        # the rename is a move, offered complete (taken at once)
        wait(lambda: Path(kept) in completed, "the rename into the series folder")
        assert ("FileMovedEvent", kept) in seen
        # events come in order: every part's would have come before the rename's
        assert not [p for _, p in seen if "/.parts/" in p or "/.hidden/" in p], seen
        assert not [p for _, p in seen if p.endswith(PART_SUFFIX)], seen

        late.rename(late.parent / "shown")  # out of hiding: watched, its file offered
        wait(lambda: root / "late" / "shown" / "inside.dcm" in offered, "the folder's file")
        (late.parent / "shown" / "new.dcm").write_bytes(b"n")
        wait(lambda: root / "late" / "shown" / "new.dcm" in offered, "a file written there")
    finally:
        fw.stop()


def test_the_parts_folder_is_made_again_and_named_when_it_is_in_the_way(tmp_path: Path) -> None:
    """``.parts`` removed while the daemon runs is made again at the next part (the spool
    stays usable without a restart); a file or a link in its place is refused with a line
    naming ``.parts``, not the spool that holds the received images."""
    root = tmp_path / "in"
    root.mkdir()
    spool = Spool(root)
    spool.ensure()
    parts = root / spool_module.SPOOL / spool_module.PARTS
    parts.rmdir()
    part = PartFile(spool, 1 << 20, lambda _n: None)
    part.write(b"x")
    part.close()
    assert (parts / part.part).is_file()
    spool.discard(part.part)
    parts.rmdir()
    parts.write_bytes(b"not a folder")
    with pytest.raises(OSError) as caught:
        spool.new_part()
    line = spool.refusal(caught.value)
    assert line.startswith(f"{parts}: ") and "not a folder" in line
    parts.unlink()
    parts.symlink_to(tmp_path)
    with pytest.raises(OSError) as caught:
        spool.new_part()
    assert spool.refusal(caught.value).startswith(f"{parts}: ")
    assert [p.name for p in tmp_path.iterdir()] == ["in"]  # nothing written through the link
