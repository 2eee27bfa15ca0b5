"""The sender against PACSs that misbehave: pynetdicom SCPs on 127.0.0.1 that refuse
Secondary Capture, answer only after the sender's timeout, or never answer.

Every SR is delivered (acknowledged) exactly once, an acknowledged item is never sent again,
what cannot be delivered is parked and shown, one hung PACS delays only itself, and each
failure is logged once per item and change. Nothing here waits on the clock: a "slow" PACS
answers only once the sender has given up on the association (it waits for the abort).
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_tools import LOOPBACK, free_port
from PIL import Image
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from serve_harness import wait_for

import xrwatch.dicom.sender as sender_mod
from xrwatch.dicom.outbox import Outbox, on_finish
from xrwatch.dicom.sender import ResultsWorker
from xrwatch.dicom.settings import Destination
from xrwatch.serve.ledger import Ledger

TIMEOUT = 6.0  # the sender's timeouts; the slow and hung peers outlast them by design


class Peer:
    """A PACS on loopback: stores SR (and SC unless ``sc=False``); ``mode`` ``slow``
    answers each instance's first C-STORE only after the sender aborted; ``hang`` never
    answers until the test ends."""

    def __init__(self, *, sc: bool = True, mode: str = "ok") -> None:
        self.mode = mode
        self.received: Counter[str] = Counter()  # C-STOREs that reached us, per SOP UID
        self.acknowledged: Counter[str] = Counter()  # answered 0x0000 on a live association
        self.in_store = threading.Event()
        self.end = threading.Event()
        ae = AE("PACS")
        ae.add_supported_context(Verification)  # C-ECHO: every PACS answers it
        ae.add_supported_context(Comprehensive3DSRStorage)
        if sc:
            ae.add_supported_context(SecondaryCaptureImageStorage)
        self.port = free_port()
        self.dest = Destination("PACS", LOOPBACK, self.port)
        self.server = ae.start_server(
            (LOOPBACK, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.received[uid] += 1
        self.in_store.set()
        if self.mode == "hang":
            self.end.wait(120)
        elif self.mode == "slow" and self.received[uid] == 1:
            deadline = time.monotonic() + 120  # bound: the sender aborts after TIMEOUT
            while event.assoc.is_established and time.monotonic() < deadline:
                time.sleep(0.05)
        if event.assoc.is_established:
            self.acknowledged[uid] += 1
        return 0x0000

    def stop(self) -> None:
        self.end.set()
        self.server.shutdown()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.stop()


def _results(tmp_path: Path, real_dicoms: list[Path], dests: list[Destination], **kw):
    """Two classified sources with heatmaps: their SRs and SCs written and queued; the
    sender retries after 0.2, 0.4 ... s unless ``retry`` says otherwise."""
    kw.setdefault("retry", 0.2)
    incoming, reports = tmp_path / "in", tmp_path / "rep"
    incoming.mkdir()
    ledger = Ledger(tmp_path / "state")
    outbox = Outbox(ledger.path)
    outbox.create()
    for i, src in enumerate(real_dicoms[:2]):
        shutil.copyfile(src, incoming / f"{i}.dcm")
        ds = pydicom.dcmread(src, force=True, stop_before_pixels=True)
        heat = reports / "heatmaps" / f"{i}.png"
        heat.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((242, 224, 3), 40 * i, np.uint8)).save(heat)
        record = {"file": f"{i}.dcm", "status": "ok", "kind": "dicom", "label": "Normal",
                  "sop_instance_uid": str(ds.SOPInstanceUID), "heatmap": f"heatmaps/{i}.png",
                  "study_instance_uid": str(ds.StudyInstanceUID), "model_sha256": "ab" * 32,
                  "probabilities": {"Normal": 0.8, "Virus": 0.2}}  # fmt: skip
        row = ledger.claim(f"{i}.dcm", f"{i}.dcm", "", 1, 1, 0.0)
        ledger.finish([(row, "ok", record)], [on_finish])
    worker = ResultsWorker(
        outbox=outbox, incoming=incoming, reports=reports, model_name="m.onnx",
        ae_title="XRWATCH", destinations=dests, timeout=TIMEOUT, **kw,
    )  # fmt: skip
    assert worker.write_due() == 2
    srs = {p.stem.split(".")[0]: p for p in reports.rglob("*.dcm")}
    uids = {p.name: str(pydicom.dcmread(p).SOPInstanceUID) for p in reports.rglob("*.dcm")}
    return worker, outbox, ledger, srs, uids


def _split(uids: dict[str, str]) -> tuple[set[str], set[str]]:
    return ({u for n, u in uids.items() if n.endswith(".SR.dcm")},
            {u for n, u in uids.items() if n.endswith(".SC.dcm")})  # fmt: skip


def test_a_pacs_refusing_sc_gets_every_sr_once_and_the_scs_are_parked_logged_once(
    tmp_path: Path, real_dicoms: list[Path], peers: list[Peer], caplog
) -> None:
    peers.append(pacs := Peer(sc=False))
    worker, outbox, ledger, _, uids = _results(tmp_path, real_dicoms, [pacs.dest], max_attempts=3)
    srs, scs = _split(uids)
    caplog.set_level(logging.DEBUG, logger="xrwatch.dicom")
    worker.start()
    try:
        wait_for(lambda: outbox.destination_counts()[str(pacs.dest)]["parked"] == len(scs),
                 60, "the SCs parked")  # fmt: skip
    finally:
        worker.stop()
    counts = outbox.destination_counts()[str(pacs.dest)]
    assert counts["sent"] == len(srs) and counts["pending"] == 0
    assert counts["parked"] == len(scs) and "does not accept" in counts["last_error"]
    assert pacs.received == Counter({u: 1 for u in srs})  # each SR once, no SC ever
    assert outbox.take_sends(str(pacs.dest)) == []  # nothing left to send: nothing resent
    parked = {p["sop_instance_uid"] for p in outbox.parked() if p["what"] == "send"}
    assert parked == scs
    assert any(f"{len(scs)} results parked" in p for p in worker.degraded())
    for uid in scs:  # 3 attempts: one WARNING (first failure), one ERROR (parked), no more
        lines = [r for r in caplog.records if uid in r.getMessage()]
        assert [r.levelname for r in lines if r.levelno >= logging.WARNING] == [
            "WARNING", "ERROR"]  # fmt: skip
    outbox.close()
    ledger.close()


def test_a_slow_pacs_gets_each_result_acknowledged_once_and_nothing_acknowledged_resent(
    tmp_path: Path, real_dicoms: list[Path], peers: list[Peer]
) -> None:
    peers.append(pacs := Peer(mode="slow"))
    worker, outbox, ledger, _, uids = _results(tmp_path, real_dicoms, [pacs.dest])
    worker.senders[0].timeout = TIMEOUT / 3  # each first C-STORE waits this, then aborts
    worker.start()
    try:
        wait_for(lambda: outbox.destination_counts()[str(pacs.dest)]["sent"] == len(uids),
                 120, "every result sent")  # fmt: skip
    finally:
        worker.stop()
    # Each first C-STORE timed out (aborted, never acknowledged to us); the resend was.
    assert pacs.received == Counter({u: 2 for u in uids.values()})
    assert pacs.acknowledged == Counter({u: 1 for u in uids.values()})
    assert outbox.take_sends(str(pacs.dest)) == []
    assert outbox.destination_counts()[str(pacs.dest)]["parked"] == 0
    outbox.close()
    ledger.close()


def test_a_hung_pacs_delays_only_itself_and_its_results_are_parked(
    tmp_path: Path, real_dicoms: list[Path], peers: list[Peer]
) -> None:
    peers.append(hung := Peer(mode="hang"))
    peers.append(good := Peer())
    worker, outbox, ledger, _, uids = _results(
        tmp_path, real_dicoms, [hung.dest, good.dest], max_attempts=1
    )
    hung_sender = next(s for s in worker.senders if s.dest == hung.dest)
    hung_sender.timeout = TIMEOUT / 3  # it never answers: each of 4 items waits this once
    worker.start()
    try:
        assert hung.in_store.wait(60)  # the hung PACS holds its sender ...
        wait_for(lambda: outbox.destination_counts()[str(good.dest)]["sent"] == len(uids),
                 60, "the good PACS served meanwhile")  # fmt: skip
        wait_for(lambda: outbox.destination_counts()[str(hung.dest)]["parked"] == len(uids),
                 240, "the hung PACS's items parked")  # fmt: skip
    finally:
        worker.stop()
    assert good.received == Counter({u: 1 for u in uids.values()})
    assert sum(hung.acknowledged.values()) == 0
    counts = outbox.destination_counts()[str(hung.dest)]
    assert counts["sent"] == 0 and "no answer" in counts["last_error"]
    assert any(str(hung.dest) in p for p in worker.degraded())
    outbox.close()
    ledger.close()


def test_stop_during_an_answered_c_store_records_it_and_sends_nothing_more(
    tmp_path: Path,
    real_dicoms: list[Path],
    peers: list[Peer],
    caplog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop while a PACS is answering a C-STORE: the answer is recorded (the item is not
    sent again at the next start), no further item is sent, and the send thread ends (an
    abort at once left it spinning in pynetdicom for 15 s and the item pending)."""
    peers.append(pacs := Peer(mode="hang"))  # answers when the test says so
    monkeypatch.setattr(sender_mod, "STOP_GRACE_SECONDS", 60.0)  # a bound, not a clock
    worker, outbox, ledger, _, uids = _results(tmp_path, real_dicoms, [pacs.dest])
    sender = worker.senders[0]
    worker.start()
    stopper = threading.Thread(target=worker.stop)
    try:
        assert pacs.in_store.wait(60)  # the first C-STORE is being answered ...
        stopper.start()
        wait_for(lambda: sender._stopping, 60, "the stop to begin")
        pacs.end.set()  # ... and the PACS answers it during the stop
        stopper.join(60)
        assert not stopper.is_alive()
    finally:
        pacs.end.set()
    assert not [t for t in worker._threads if t.is_alive()]
    assert "did not end" not in caplog.text
    assert sum(pacs.acknowledged.values()) == 1 == sum(pacs.received.values())
    counts = outbox.destination_counts()[str(pacs.dest)]
    assert counts["sent"] == 1 and counts["pending"] == len(uids) - 1
    assert counts["failed_attempts"] == 0  # the rest untried, due at the next start
    outbox.close()
    ledger.close()


def test_stop_aborts_an_association_a_silent_peer_never_answers(
    tmp_path: Path, real_dicoms: list[Path]
) -> None:
    """A peer that accepts the TCP connection and never says a word: the sender's stop
    aborts the association being negotiated instead of waiting for its timeout."""
    listener = socket.create_server((LOOPBACK, 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    silent = Destination("PACS", LOOPBACK, listener.getsockname()[1])
    worker, outbox, ledger, _, uids = _results(tmp_path, real_dicoms, [silent])
    worker.senders[0].timeout = 600.0  # far longer than this test may take
    worker.start()
    try:
        wait_for(lambda: accepted, 60, "the sender connected")
        stopper = threading.Thread(target=worker.stop)
        stopper.start()
        stopper.join(60)  # a bound only: without the abort it would take 600 s
        assert not stopper.is_alive()
    finally:
        for conn in accepted:
            conn.close()
        listener.close()
    counts = outbox.destination_counts()[str(silent)]
    assert counts["pending"] == len(uids) and counts["failed_attempts"] == 0
    outbox.close()
    ledger.close()


def test_stop_leaves_behind_a_send_thread_that_ignores_the_abort(
    tmp_path: Path, real_dicoms: list[Path], monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A send thread stuck where the abort cannot reach it (pynetdicom's send_c_store spins
    for ever once its association's reactor is gone, seen under load) does not hold the
    daemon's stop: it is left behind with a warning, its items still pending."""
    import xrwatch.dicom.sender as sender_mod

    stuck, release = threading.Event(), threading.Event()

    def spin(self: object) -> int:
        stuck.set()
        release.wait(120)  # deaf to abort(), as that loop is
        return 0

    monkeypatch.setattr(sender_mod.DestinationSender, "send_due", spin)
    monkeypatch.setattr(sender_mod, "STOP_JOIN_SECONDS", 1.0)
    down = Destination("PACS", LOOPBACK, free_port())
    worker, outbox, ledger, _, uids = _results(tmp_path, real_dicoms, [down])
    caplog.set_level(logging.WARNING, logger="xrwatch.dicom")
    worker.start()
    try:
        assert stuck.wait(60), "the send thread never started"
        stopper = threading.Thread(target=worker.stop)
        stopper.start()
        stopper.join(60)  # a bound only: without the deadline it would wait for release
        assert not stopper.is_alive()
        assert any("xrwatch-dicom-send-0 did not end" in r.getMessage() for r in caplog.records)
        assert outbox.destination_counts()[str(down)]["pending"] == len(uids)
    finally:
        release.set()
    outbox.close()
    ledger.close()


def test_the_configured_first_retry_is_what_failed_sends_wait(
    tmp_path: Path, real_dicoms: list[Path], peers: list[Peer]
) -> None:
    """``retry`` (``dicom_send_retry``) is the wait after a refused item and after an
    unreachable destination (the default would be 2 s)."""
    peers.append(pacs := Peer(sc=False))  # takes the SRs, refuses the SCs
    down = Destination("PACS", LOOPBACK, free_port())  # nothing listens there
    worker, outbox, ledger, _, uids = _results(
        tmp_path, real_dicoms, [pacs.dest, down], retry=600.0
    )
    now = time.time()
    worker.send_due(pacs.dest)
    worker.send_due(down)
    rows = (
        outbox._con()
        .execute(
            "SELECT destination, state, next_attempt_at FROM dicom_outbox WHERE state='pending'"
        )
        .fetchall()
    )
    waiting = {(d, s) for d, s, _ in rows}
    assert waiting == {(str(pacs.dest), "pending"), (str(down), "pending")}
    assert len(rows) == len(uids) // 2 + len(uids)  # the SCs refused, everything to `down`
    assert min(at for _, _, at in rows) > now + 300  # 600 s, not the default 2
    outbox.close()
    ledger.close()


def test_a_c_store_aborted_by_the_stop_counts_no_attempt(
    tmp_path: Path, real_dicoms: list[Path], peers: list[Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PACS that does not answer before the stop's grace ends: the C-STORE is aborted and
    its item waits for the next start untried (not counted, so never parked by stops)."""
    peers.append(hung := Peer(mode="hang"))
    monkeypatch.setattr(sender_mod, "STOP_GRACE_SECONDS", 0.0)
    worker, outbox, ledger, _, uids = _results(tmp_path, real_dicoms, [hung.dest], max_attempts=1)
    worker.start()
    try:
        assert hung.in_store.wait(60)
        worker.stop()
    finally:
        hung.end.set()
    counts = outbox.destination_counts()[str(hung.dest)]
    assert counts["pending"] == len(uids) and counts["parked"] == 0
    assert counts["failed_attempts"] == 0
    outbox.close()
    ledger.close()


def test_an_unreachable_pacs_parks_nothing_and_logs_once(
    tmp_path: Path, real_dicoms: list[Path], caplog
) -> None:
    down = Destination("PACS", LOOPBACK, free_port())  # nothing listens there
    worker, outbox, ledger, _, uids = _results(tmp_path, real_dicoms, [down], max_attempts=1)
    caplog.set_level(logging.DEBUG, logger="xrwatch.dicom")
    for _ in range(3):
        worker.send_due(down)
        outbox._con().execute("UPDATE dicom_outbox SET next_attempt_at=0")  # due again now
    counts = outbox.destination_counts()[str(down)]
    assert counts["pending"] == len(uids) and counts["parked"] == 0  # the PACS was down
    assert counts["failed_attempts"] == 0
    warnings_ = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings_) == 1 and "cannot send results" in warnings_[0].getMessage()
    outbox.close()
    ledger.close()
