"""Results as DICOM: build each pending SR into ``REPORTS/dicom`` (:mod:`.writer`), then
C-STORE it to every configured destination, from the ledger's ``dicom_results`` and
``dicom_outbox`` tables.

Threads: one writer, and one sender per destination, so neither the daemon's loop nor one
destination ever waits for another (a PACS that hangs delays only its own results). Every
association has its own timeouts (association, each C-STORE's answer, the network).

Per item, never per batch: each acknowledged C-STORE is recorded ``sent`` at once, in its
own transaction, before the next item is sent; a refused one counts an attempt for itself
alone and waits with exponential back-off, and after ``max_attempts`` is parked (dead
letter, shown by ``status``). An item whose SOP class the destination did not accept
(a PACS that takes SR but not Secondary Capture) is refused alone; the others go. A daemon
killed with ``-9`` resends at most the one C-STORE it was waiting for (with the same SOP
Instance UID, so the PACS still holds one instance). A destination that cannot be reached
waits with back-off without counting attempts (nothing is parked because the PACS was
down); an SR file that vanished from REPORTS is built again.

Failures are logged once per item and change (first failure, a new error, parked,
recovered) and once per destination for an unreachable one, not once per attempt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread

from xrwatch.dicom.builder import BuilderProcess
from xrwatch.dicom.outbox import BACKOFF_FIRST, MAX_SEND_ATTEMPTS, DueSend, Outbox, backoff
from xrwatch.dicom.settings import Destination
from xrwatch.dicom.writer import ResultWriter, inside, sr_relpath

__all__ = ["DEFAULT_TIMEOUT", "ResultsWorker", "echo", "sr_relpath"]

logger = logging.getLogger(__name__)

IDLE_SECONDS = 1.0  # how often an idle thread looks for new work
DEFAULT_TIMEOUT = 30.0  # seconds: association, each C-STORE's answer, network silence
# At stop, after the associations are aborted, how long the send threads get to end. A
# thread inside pynetdicom's send_c_store when its association is aborted can spin for ever
# (it waits for the association's reactor to pause, and an aborted reactor never does): it
# is a daemon thread, left behind; its item stays pending and is sent again at next start.
STOP_JOIN_SECONDS = 15.0
# At stop, how long an association in progress may go on before it is aborted: it sends no
# further item, and a C-STORE being answered (a PACS that answers: milliseconds) is
# acknowledged and recorded instead of aborted (which left the thread spinning as above:
# every stop during a send took 15 s, and its item was sent again at the next start).
STOP_GRACE_SECONDS = 2.0
SEND_BATCH = 32  # items per association
VERIFICATION = "1.2.840.10008.1.1"
# Fault injection for the exactly-once test: die right after a destination acknowledged a
# C-STORE and before the ledger records it (the window in which an SR could be sent twice).
_FAULT_ENV = "XRWATCH_DICOM_FAULT"


class _OwnAssociations(logging.Filter):
    """Drops pynetdicom's records about the associations we request (the sender's and
    ``dicom-echo``'s): ``connection refused`` once per attempt would flood the log, and the
    sender logs each failure itself, once per change. Their DEBUG and INFO records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pynetdicom.association import Association

        thread: Any = threading.current_thread()  # an association, or its DUL's reactor
        assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
        if isinstance(assoc, Association) and assoc.is_requestor:
            return record.levelno < logging.WARNING
        return True


_FILTER = _OwnAssociations()


def quiet_own_associations() -> None:
    """Put :class:`_OwnAssociations` on every pynetdicom logger (once)."""
    import pynetdicom  # noqa: F401  (its module loggers exist once it is imported)

    for name in list(logging.root.manager.loggerDict):
        if name == "pynetdicom" or name.startswith("pynetdicom."):
            log = logging.getLogger(name)
            if _FILTER not in log.filters:
                log.addFilter(_FILTER)


def _abort_negotiation(ae: Any) -> None:
    """End an association request of ``ae`` still waiting for the peer's answer: its
    caller waits for a primitive from the DUL (up to the ACSE timeout), so hand it an
    A-P-ABORT, as the DUL itself does when the connection drops."""
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.pdu_primitives import A_P_ABORT

    for thread in threading.enumerate():
        if not isinstance(thread, DULServiceProvider):
            continue
        assoc: Any = thread.assoc
        if getattr(assoc, "ae", None) is ae and not assoc.is_established:
            thread.to_user_queue.put(A_P_ABORT())


def _acknowledged(status: Any) -> tuple[bool | None, str]:
    """``(True, detail)`` success or warning; ``(False, ...)`` refused; ``(None, ...)``
    no answer (timed out or connection lost)."""
    code = getattr(status, "Status", None)
    if code is None:
        return None, "no answer to the C-STORE (timed out or connection lost)"
    if code == 0x0000 or 0xB000 <= code <= 0xB0FF:
        return True, f"status 0x{code:04X}"
    return False, f"refused with status 0x{code:04X}"


class DestinationSender:
    """Sends one destination's due items, one association at a time."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        reports: Path,
        ae_title: str,
        dest: Destination,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = MAX_SEND_ATTEMPTS,
        retry: float = BACKOFF_FIRST,
        on_sent: Callable[[str, bool], None] = lambda _d, _ok: None,
    ) -> None:
        self.outbox, self.reports, self.ae_title, self.dest = outbox, reports, ae_title, dest
        self.timeout, self.max_attempts, self.on_sent = timeout, max_attempts, on_sent
        self.retry = retry  # seconds before the first retry; doubled per failure
        self.unreachable: str | None = None  # the error while the destination is down
        self._failures = 0  # consecutive association failures (the destination's back-off)
        self._ae: Any = None  # the AE of the association in progress
        self._stopping = False
        self._lock = threading.Lock()

    def finish(self) -> None:
        """Start no association and send no further item; the C-STORE in progress is
        answered and recorded, then the association released (see :meth:`abort`)."""
        with self._lock:
            self._stopping = True

    def abort(self) -> None:
        """Abort the association in progress, even one still being negotiated (at
        shutdown: a PACS that hangs must not hold the daemon for its timeout)."""
        with self._lock:
            self._stopping = True
            ae = self._ae
        if ae is not None:
            ae.shutdown()  # aborts its established associations
            _abort_negotiation(ae)

    def send_due(self) -> int:
        """Send what is due; return how many items were handled."""
        if self._stopping:
            return 0
        due = self.outbox.take_sends(str(self.dest), SEND_BATCH)
        if not due:
            return 0
        loaded: list[tuple[DueSend, Dataset]] = []
        for item in due:
            try:
                ds: Dataset = dcmread(inside(self.reports, item.sr_path))
                if str(ds.SOPInstanceUID) != item.sr_sop_uid:
                    raise ValueError("it holds another instance")
            except Exception as exc:  # gone or damaged: build it again, then send it
                self.outbox.rebuild(item.file_id)
                error = f"{item.sr_path}: cannot be read ({exc}); built again"
                self.outbox.defer([item.id], backoff(1, self.retry), error)
                if error != item.last_error:
                    logger.warning("%s", error)
                continue
            loaded.append((item, ds))
        if not loaded:
            return len(due)
        try:
            assoc = self._associate({str(ds.SOPClassUID) for _, ds in loaded})
        except ConnectionError as exc:
            with self._lock:
                self._ae = None
            if self._stopping:  # not the destination's failure: untried, due at next start
                self._untried([item.id for item, _ in loaded])
            else:
                self._unreachable(str(exc), [item.id for item, _ in loaded])
            return len(due)
        try:
            for n, (item, ds) in enumerate(loaded):
                if not assoc.is_established or self._stopping:  # the rest go back untried
                    self._untried([i.id for i, _ in loaded[n:]])
                    break
                self._send_one(assoc, item, ds)
        finally:
            if assoc.is_established:
                assoc.release()
            with self._lock:
                self._ae = None
        return len(due)

    def _associate(self, sop_classes: set[str]) -> Any:
        from pynetdicom import AE

        quiet_own_associations()
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        for sop_class in sorted(sop_classes):
            ae.add_requested_context(sop_class)
        # Verification too: a PACS that accepts none of these SOP classes still associates,
        # so each item is refused alone (and parked in time), not the destination judged down.
        ae.add_requested_context(VERIFICATION)
        with self._lock:
            if self._stopping:
                raise ConnectionError("the daemon is stopping")
            self._ae = ae
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title)
        if not assoc.is_established:
            what = "rejected the association" if assoc.is_rejected else "no association"
            raise ConnectionError(f"{what} (refused, unreachable or no answer)")
        send_at_once(assoc)
        if self.unreachable is not None:
            logger.info("%s: reachable again", self.dest)
        self.unreachable, self._failures = None, 0
        return assoc

    def _untried(self, ids: list[int]) -> None:
        """Put items back as not tried (no attempt counted, no error): due again now."""
        self.outbox.defer(ids, 0.0, None)

    def _unreachable(self, error: str, ids: list[int]) -> None:
        self._failures += 1
        wait = backoff(self._failures, self.retry)
        self.outbox.defer(ids, wait, error)
        if error != self.unreachable:
            logger.warning(
                "%s: cannot send results: %s; %d waiting, retried with back-off (logged "
                "again when this changes)",
                self.dest,
                error,
                len(ids),
            )
        self.unreachable = error
        for _ in ids:
            self.on_sent(str(self.dest), False)

    def _send_one(self, assoc: Any, item: DueSend, ds: Dataset) -> None:
        sop_class = str(ds.SOPClassUID)
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            ok: bool | None = False
            detail = (
                f"the destination does not accept {ds.SOPClassUID.name} (SOP class {sop_class})"
            )
        else:
            try:
                ok, detail = _acknowledged(assoc.send_c_store(ds))
            except Exception as exc:  # e.g. a data set it cannot encode for the context
                ok, detail = False, f"cannot send: {exc}"
            if ok is None and self._stopping:  # aborted by the stop, not the PACS's failure
                self._untried([item.id])
                logger.info(
                    "%s: not answered by %s before the stop; sent at the next start",
                    item.sr_sop_uid, self.dest,
                )  # fmt: skip
                return
        if ok:
            if os.environ.get(_FAULT_ENV) == "kill-after-send":
                os.kill(os.getpid(), signal.SIGKILL)
            self.outbox.sent(item.id)
            if item.last_error:
                logger.info(
                    "%s sent to %s after %d failed attempts (%s)",
                    item.sr_sop_uid, self.dest, item.attempts, detail,
                )  # fmt: skip
            else:
                logger.info("%s sent to %s (%s)", item.sr_sop_uid, self.dest, detail)
        else:
            attempts = item.attempts + 1
            state, wait = self.outbox.send_failed(
                item.id, attempts, detail, max_attempts=self.max_attempts, first_wait=self.retry
            )
            if state == "parked":
                logger.error(
                    "%s not sent to %s, given up after %d attempts (parked; see status): %s",
                    item.sr_sop_uid, self.dest, attempts, detail,
                )  # fmt: skip
            elif detail != item.last_error:
                logger.warning(
                    "%s not sent to %s (%s); retried with back-off (%.0f s first), logged "
                    "again only if this changes",
                    item.sr_sop_uid, self.dest, detail, wait,
                )  # fmt: skip
            else:
                logger.debug("%s not sent to %s again (%s)", item.sr_sop_uid, self.dest, detail)
        self.on_sent(str(self.dest), bool(ok))


class ResultsWorker:
    """The writer thread and one sender thread per destination."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        incoming: Path,
        reports: Path,
        model_name: str,
        ae_title: str,
        destinations: list[Destination],
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = MAX_SEND_ATTEMPTS,
        retry: float = BACKOFF_FIRST,
        on_written: Callable[[], None] = lambda: None,
        on_sent: Callable[[str, bool], None] = lambda _d, _ok: None,
    ) -> None:
        self.outbox = outbox
        self.destinations = destinations
        # SRs built in a worker process (xrwatch.dicom.builder), off the daemon's GIL
        self.builder = BuilderProcess()
        self.writer = ResultWriter(
            outbox=outbox, incoming=incoming, reports=reports, model_name=model_name,
            destinations=[str(d) for d in destinations], on_written=on_written,
            builder=self.builder,
        )  # fmt: skip
        self.senders = [
            DestinationSender(
                outbox=outbox,
                reports=reports,
                ae_title=ae_title,
                dest=d,
                timeout=timeout,
                max_attempts=max_attempts,
                retry=retry,
                on_sent=on_sent,
            )
            for d in destinations
        ]
        self._stop = threading.Event()
        self.wake = threading.Event()  # new results recorded: write them
        self._send_wakes = [threading.Event() for _ in self.senders]
        self._send_threads = [
            threading.Thread(
                target=self._send_loop, args=(i,), name=f"xrwatch-dicom-send-{i}", daemon=True
            )
            for i in range(len(self.senders))
        ]
        self._threads = [
            threading.Thread(target=self._write_loop, name="xrwatch-dicom-write", daemon=True),
            *self._send_threads,
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for event in (self.wake, *self._send_wakes):
            event.set()
        for sender in self.senders:
            sender.finish()
        grace = time.monotonic() + STOP_GRACE_SECONDS
        for sender, t in zip(self.senders, self._send_threads, strict=True):
            if t.ident is not None:
                t.join(max(grace - time.monotonic(), 0.0))
            if t.is_alive():  # still negotiating, or a C-STORE the PACS does not answer
                sender.abort()
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        for t in self._threads:
            if t.ident is None:  # never started (the node failed to start)
                continue
            t.join(max(deadline - time.monotonic(), 0.0))
            if t.is_alive():
                logger.warning(
                    "%s did not end %.0f s after its association was aborted; left behind "
                    "(its result stays pending and is sent again at the next start)",
                    t.name,
                    STOP_JOIN_SECONDS,
                )
        self.builder.close()  # after the writer's last build; later ones run here

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                busy = self.writer.write_due() > 0
            except Exception:  # the ledger busy or broken: log, wait, retry
                logger.exception("DICOM results writer failed; retrying")
            if busy:
                for event in self._send_wakes:
                    event.set()
            else:
                self.wake.wait(IDLE_SECONDS)
                self.wake.clear()

    def _send_loop(self, i: int) -> None:
        sender, wake = self.senders[i], self._send_wakes[i]
        while not self._stop.is_set():
            busy = False
            try:
                busy = sender.send_due() > 0
            except Exception:
                logger.exception("DICOM sender to %s failed; retrying", sender.dest)
            if not busy:
                wake.wait(IDLE_SECONDS)
                wake.clear()

    def write_due(self) -> int:
        return self.writer.write_due()

    def send_due(self, dest: Destination) -> int:
        return next(s for s in self.senders if s.dest == dest).send_due()

    def finish_due(self) -> None:
        """Write and send what is due now, on the caller's thread (``--once``); what
        fails waits for its back-off, i.e. for the next start."""
        while self.writer.write_due():
            pass
        for sender in self.senders:
            with sender._lock:
                sender._stopping = False  # stopped threads; this caller sends now
            while sender.send_due():
                if sender.unreachable is not None:
                    break

    def degraded(self) -> list[str]:
        """What ``/healthz`` adds to a healthy answer (degraded, not down): destinations
        that cannot be reached, results parked, SRs that could not be built."""
        out = [
            f"DICOM destination {s.dest}: {s.unreachable}" for s in self.senders if s.unreachable
        ]
        counts = self.outbox.destination_counts()
        for dest, c in counts.items():
            if c.get("parked"):
                out.append(f"DICOM destination {dest}: {c['parked']} results parked")
        failed = self.outbox.result_counts().get("failed", 0)
        if failed:
            out.append(f"{failed} DICOM SRs could not be built (parked)")
        return out


def send_at_once(assoc: Any) -> None:
    """Send each PDU as soon as it is written (``TCP_NODELAY``): with Nagle's algorithm on
    (pynetdicom leaves it), each C-STORE's data PDU waits until the PACS acknowledges the
    command PDU, which Linux and others delay while they have nothing to send back: to
    DCMTK's storescp, 91 ms per small SC with it, 48 ms without
    (``benchmarks/dicom_latency.py``)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def echo(dest: Destination, ae_title: str, timeout: float = 10.0) -> tuple[bool, str]:
    """C-ECHO ``dest`` as ``ae_title``: ``(answered with success, what happened)``."""
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if assoc.is_rejected:
        return False, "association rejected (is our AE title allowed there?)"
    if not assoc.is_established:
        return False, "no association: nothing answers there, or it aborted"
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        return False, "no answer to the C-ECHO (timed out or connection lost)"
    if code != 0x0000:
        return False, f"C-ECHO answered with status 0x{code:04X}"
    return True, "C-ECHO succeeded"
