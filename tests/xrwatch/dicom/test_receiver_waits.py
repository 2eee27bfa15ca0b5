"""What the node's associations wait for (``xrwatch.dicom.reactor_waits``), and the TCP
options that keep a C-STORE from waiting on the other side's delayed acknowledgement
(``gate.ack_now`` on receipt, ``sender.send_at_once`` on sending). Speeds are measured by
``benchmarks/dicom_latency.py``; these tests check behaviour: the same exchanges succeed,
and an idle association no longer wakes a thousand times a second."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from dicom_tools import LOOPBACK, free_port
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from xrwatch.dicom import gate, reactor_waits
from xrwatch.dicom.sender import DestinationSender
from xrwatch.dicom.settings import Destination

IDLE = 1.0  # seconds an association is left idle while its wake-ups are counted


def _sc(rows: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.random.default_rng(rows).integers(0, 255, rows * rows, np.uint8).tobytes()
    return ds


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
        waits = reactor_waits.attach(event.assoc)
        assert waits is not None, "pynetdicom's reactors are not as reactor_waits expects"
        self.waits.append(waits)

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
        (waits,) = acceptor.waits
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
