"""What the node's associations wait for (``xrwatch.dicom.reactor_waits``), and the TCP
options that keep a C-STORE from waiting on the other side's delayed acknowledgement
(``gate.ack_now`` on receipt, ``sender.send_at_once`` on sending). Speeds are measured by
``benchmarks/dicom_latency.py``; these tests check behaviour: the same exchanges succeed,
and an idle association no longer wakes a thousand times a second."""

from __future__ import annotations

import os
import queue
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from dicom_tools import LOOPBACK, echoscu, free_port
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from serve_harness import wait_for

from tests.helpers.dicom_factory import build_dataset
from tests.helpers.procs import fd_targets
from xrwatch.dicom import gate, reactor_waits
from xrwatch.dicom.sender import DestinationSender
from xrwatch.dicom.settings import Destination

IDLE = 1.0  # seconds an association is left idle while its wake-ups are counted


def _sc(rows: int) -> Dataset:
    pixels = np.random.default_rng(rows).integers(0, 255, (rows, rows), np.uint8)
    return build_dataset(pixels=pixels, modality="OT", sop_class_uid=SecondaryCaptureImageStorage)


class Acceptor:
    """A pynetdicom server whose associations get the receiver's waits (as the gate gives
    them at EVT_CONN_OPEN); it keeps what it was sent and each association's waits."""

    def __init__(self) -> None:
        self.waits: list[reactor_waits.Waits] = []
        self.stored: list[bytes] = []
        self.released = threading.Event()
        ae = AE("XRWATCH")
        ae.maximum_pdu_size = 16384  # a 300 x 300 image: six P-DATA PDUs
        ae.add_supported_context(Verification)
        ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        self.port = free_port()
        self.server = ae.start_server(
            (LOOPBACK, self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, self._opened),
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_RELEASED, lambda e: self.released.set()),
            ],
        )

    def _opened(self, event: Any) -> None:
        self.waits.append(reactor_waits.attach(event.assoc))  # None: not as expected

    def the_waits(self) -> reactor_waits.Waits:
        """The one association's waits (asserted here: a handler's assert is swallowed)."""
        assert len(self.waits) == 1
        assert self.waits[0] is not None, "pynetdicom's reactors are not as expected"
        return self.waits[0]

    def _store(self, event: Any) -> int:
        self.stored.append(bytes(event.dataset.PixelData))
        return 0x0000


@pytest.fixture
def acceptor() -> Iterator[Acceptor]:
    a = Acceptor()
    yield a
    a.server.shutdown()


def _associate(port: int) -> Any:
    ae = AE("MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(LOOPBACK, port, ae_title="XRWATCH")
    assert assoc.is_established
    return assoc


def test_an_idle_association_waits_instead_of_polling_and_still_answers(acceptor) -> None:
    assoc = _associate(acceptor.port)
    try:
        waits = acceptor.the_waits()
        before = waits.wakeups
        time.sleep(IDLE)
        idle_wakeups = waits.wakeups - before
        # polling: two threads x 1,000 a second; waiting: two per LONGEST_WAIT (40)
        assert 2 <= idle_wakeups <= 200, idle_wakeups

        # after the idle second: answered, and a data set over several PDUs arrives whole
        assert assoc.send_c_echo().Status == 0x0000
        images = [_sc(300), _sc(120)]
        for ds in images:
            assert assoc.send_c_store(ds).Status == 0x0000
        assert acceptor.stored == [bytes(ds.PixelData) for ds in images]
    finally:
        assoc.release()
    assert acceptor.released.wait(10)  # the release request woke the association thread


def test_an_abort_ends_a_waiting_association(acceptor) -> None:
    assoc = _associate(acceptor.port)
    time.sleep(0.2)  # both of its threads are waiting
    acceptor.the_waits()
    assoc.abort()
    server_side = acceptor.server.active_associations
    deadline = time.monotonic() + 10
    while server_side and time.monotonic() < deadline:
        time.sleep(0.05)
        server_side = acceptor.server.active_associations
    assert server_side == []


def test_nothing_is_attached_where_pynetdicom_is_not_as_expected(
    acceptor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reactor_waits, "_installed", False)
    seen: list[Any] = []
    acceptor.server.unbind(evt.EVT_CONN_OPEN, acceptor._opened)
    acceptor.server.bind(evt.EVT_CONN_OPEN, lambda e: seen.append(reactor_waits.attach(e.assoc)))
    assoc = _associate(acceptor.port)
    try:
        assert assoc.send_c_echo().Status == 0x0000  # pynetdicom's own polling answers
    finally:
        assoc.release()
    assert seen == [None]


def test_a_pynetdicom_whose_reactors_are_not_as_expected_is_left_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The detection itself: a ``dul`` module whose ``time`` is something else (a future
    pynetdicom, another patch) gets no stand-in, and no association gets waits."""
    from pynetdicom import dul

    other = SimpleNamespace(sleep=time.sleep, time=time.time, monotonic=time.monotonic)
    monkeypatch.setattr(dul, "time", other)
    monkeypatch.setattr(reactor_waits, "_installed", None)  # not tried yet
    assert reactor_waits.attach(_fake_association()) is None
    assert dul.time is other


def _fake_association() -> SimpleNamespace:
    """The parts of an association the waits use: its queues, no socket."""
    dul = SimpleNamespace(to_provider_queue=queue.Queue(), to_user_queue=queue.Queue(), socket=None)
    return SimpleNamespace(dul=dul, dimse=SimpleNamespace(msg_queue=queue.Queue()))


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _pipe(fd: int) -> str | None:
    """What descriptor ``fd`` of this process is (``pipe:[inode]``), None when closed."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def test_what_is_queued_for_a_thread_wakes_it_and_the_pipe_is_given_back() -> None:
    assoc = _fake_association()
    waits = reactor_waits.Waits(assoc)
    ends = [_pipe(waits._read), _pipe(waits._write)]
    assert all(e is not None and e.startswith("pipe:") for e in ends)

    assert not _readable(waits._read)
    assoc.dul.to_provider_queue.put("C-STORE-RSP")  # the association thread answers
    assert _readable(waits._read)  # the DUL thread's select ends

    assert not waits._ready.is_set()
    assoc.dimse.msg_queue.put_nowait((1, "C-STORE-RQ"))  # the DUL thread decoded a message
    assert waits._ready.is_set()
    assoc.dimse.msg_queue.put((1, "C-STORE-RQ"))
    assoc.dimse.msg_queue.get()  # the reactor takes one message per pass ...
    waits.assoc_wait()  # ... and the one left ends the next wait at once
    assert not waits._ready.is_set()  # cleared: only a new put sets it again
    assoc.dul.to_user_queue.put("A-RELEASE-RQ")
    assert waits._ready.is_set()

    reactor_waits.release(assoc)
    assert waits.closed
    # closed: gone, or (reused meanwhile by another thread) no longer this pipe
    assert _pipe(waits._read) != ends[0] and _pipe(waits._write) != ends[1]
    assoc.dul.to_provider_queue.put("late")  # writes nowhere once given back
    reactor_waits.release(assoc)  # twice: nothing more


def test_a_message_left_in_the_queue_ends_the_wait_at_once(monkeypatch) -> None:
    monkeypatch.setattr(reactor_waits, "LONGEST_WAIT", 3600.0)  # only a wake-up ends it
    assoc = _fake_association()
    waits = reactor_waits.Waits(assoc)
    try:
        assoc.dimse.msg_queue.put((1, "first"))
        assoc.dimse.msg_queue.put((1, "second"))
        assoc.dimse.msg_queue.get()  # the reactor served the first; the event is still set
        waits._ready.clear()  # as if cleared by the wait before the second put
        t = threading.Thread(target=waits.assoc_wait, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the wait ignored the message already queued"
    finally:
        waits.close()


def test_the_daemon_gives_back_each_association_s_pipe(folders, daemons, dcmtk) -> None:
    """An open association holds its socket and its pipe in the daemon (the gate attached
    the waits); twenty C-ECHO associations later the daemon's open descriptors are back
    where they were (each pipe closed when its association ends, not when the cycle
    collector gets to it)."""
    incoming, reports = folders
    port = free_port()
    d = daemons(incoming, reports, "--dicom-port", str(port), "--dicom-host", LOOPBACK,
                "--dicom-allow-ae", "MODALITY").start()  # fmt: skip
    fds = Path(f"/proc/{d.proc.pid}/fd")
    baseline = len(os.listdir(fds))
    before = fd_targets(d.proc.pid)
    ae = AE("MODALITY")
    ae.add_requested_context(Verification)
    held = ae.associate(LOOPBACK, port, ae_title="XRWATCH")
    assert held.is_established
    try:
        # a new pipe whose two ends the daemon holds (without the waits: none)
        wait_for(lambda: _new_pipe_ends(d.proc.pid, before) == 2, 30, "the association's pipe")
    finally:
        held.release()
    for _ in range(20):
        assert echoscu(dcmtk, port, "MODALITY") == 0
    wait_for(lambda: len(os.listdir(fds)) <= baseline + 2, 30, "the pipes given back")
    assert d.stop() == 0


def _new_pipe_ends(pid: int, before: list[str]) -> int:
    """Descriptors of pipes that were not open in ``before``."""
    return sum(1 for t in fd_targets(pid) if t.startswith("pipe:") and t not in before)


class _RecordingSocket:
    """Gives ``data`` in pieces and records the options set on it."""

    def __init__(self, data: bytes) -> None:
        self.data, self.options = data, []

    def recv_into(self, view: memoryview, n: int) -> int:
        k = min(n, 1000, len(self.data))
        view[:k] = self.data[:k]
        self.data = self.data[k:]
        return k

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux's")
def test_each_pdu_read_is_acknowledged_at_once() -> None:
    sock = _RecordingSocket(b"x" * 2500)
    assert gate.read_exactly(sock, 2500) == b"x" * 2500  # type: ignore[arg-type]
    assert sock.options == [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)]


def test_results_are_sent_without_waiting_for_acknowledgements(tmp_path) -> None:
    """The sender's associations have Nagle's algorithm off (TCP_NODELAY), which a socket
    does not have by default."""
    pacs = AE("PACS")
    pacs.add_supported_context(Verification)
    port = free_port()
    server = pacs.start_server((LOOPBACK, port), block=False)
    try:
        sender = DestinationSender(
            outbox=None,  # type: ignore[arg-type]  # _associate does not use it
            reports=tmp_path,
            ae_title="XRWATCH",
            dest=Destination("PACS", LOOPBACK, port),
        )
        assoc = sender._associate(set())
        try:
            sock = assoc.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            with socket.create_connection((LOOPBACK, port)) as plain:  # the default, for contrast
                assert plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        finally:
            assoc.release()
    finally:
        server.shutdown()
