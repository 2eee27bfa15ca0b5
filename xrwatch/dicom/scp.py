"""The receiver: a pynetdicom C-STORE/C-ECHO SCP that spools instances into INCOMING.

Each instance streams, exactly as received (file meta + the data set in the negotiated
transfer syntax), into a hidden file in ``INCOMING/dicom/.parts`` (:mod:`.spool`: reached without
following links; a data set over ``max_file_mb`` is refused while it streams in). Once
complete it is read in bounded memory (:mod:`.header`) and then:

- cut short or unreadable: failed at once (status C000 with a comment), never kept;
- made by xrwatch (:mod:`.provenance`: our own SR or heatmap routed back by a PACS):
  acknowledged, not kept (``xrwatch_dicom_own_output``);
- not a radiograph (CT, MR, SR, PDF ... a routed study carries them): acknowledged, not
  kept (``xrwatch_dicom_ignored{sop_class}``), unless ``dicom_accept_other``;
- a SOP Instance UID received before: the same bytes are acknowledged and not processed
  again; other content is refused with 0111 (:mod:`.receipts`);
- else renamed to ``INCOMING/dicom/<Study UID>/<Series UID>/<SOP UID>.dcm`` (UIDs only,
  never patient data), fsynced, recorded in the ledger, then acknowledged; from there the
  daemon's usual path (watcher, claim, classify, record) takes over.

Access control happens at association (A-ASSOCIATE-RJ, each refusal logged with its real
reason): the called AE title must be ours; the calling AE title must be in
``dicom_allow_ae`` ("calling AE title not recognised"); the source address in
``dicom_allow_hosts`` when set ("no reason given": DICOM has no reason for addresses);
at most ``dicom_max_associations`` at once and ``dicom_max_per_host`` from one address
("local limit exceeded", transient). What a peer can hold is bounded by :mod:`.gate`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt

from xrwatch.dicom.gate import MAX_WAITING, Gate, GatedServer, Peer
from xrwatch.dicom.header import read_header
from xrwatch.dicom.outbox import Outbox
from xrwatch.dicom.pynetdicom_glue import (
    Refused,
    SharedUIDContexts,
    decodable_transfer_syntaxes,
    quiet_pynetdicom,
    stream_to_spool,
    tls_context,
)
from xrwatch.dicom.receipts import Receipts
from xrwatch.dicom.settings import ReceiverLimits
from xrwatch.dicom.spool import SPOOL, PartFile, Spool
from xrwatch.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["SPOOL", "Receiver", "decodable_transfer_syntaxes", "tls_context"]

# Projection radiography: what the classifier reads.
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO

# DIMSE statuses (PS3.4 B.2.3, PS3.7 C.4)
SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


def _valid_uid(value: Any) -> str | None:
    text = str(value or "").strip()
    if text and len(text) <= 64 and UID(text).is_valid and ".." not in text:
        return text
    return None


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO
    return ds


class Receiver:
    """The C-STORE/C-ECHO SCP. ``on_file(path)`` is called after each new instance."""

    def __init__(
        self,
        *,
        incoming: Path,
        outbox: Outbox,
        ae_title: str,
        host: str,
        port: int,
        allow_ae: tuple[str, ...],
        allow_hosts: tuple[str, ...] = (),
        accept_other: bool = False,
        limits: ReceiverLimits = ReceiverLimits(),
        ssl_context: ssl.SSLContext | None = None,
        on_file: Callable[[Path], None] = lambda _p: None,
        on_event: Callable[[str], None] = lambda _e: None,
        on_ignored: Callable[[str], None] = lambda _c: None,
    ) -> None:
        self.incoming = incoming
        self.spool = Spool(incoming)
        self.outbox = outbox
        self.receipts = Receipts(outbox.db)
        self.ae_title = ae_title
        self.host, self.port = host, port
        self.allow_ae = {a.strip() for a in allow_ae}
        self.allow_nets = [ipaddress.ip_network(h, strict=False) for h in allow_hosts]
        self.accept_other = accept_other
        self.limits = limits
        self.on_file = on_file
        self.on_event = on_event  # metrics, by outcome (node.RECEIVE_OUTCOMES)
        self.on_ignored = on_ignored  # metrics: a non-radiograph acknowledged and dropped
        self._lock = threading.Lock()  # one SOP Instance UID is never written twice at once
        self._server: GatedServer | None = None
        self._thread: threading.Thread | None = None
        self.gate = Gate(limits, ssl_context, on_dropped=lambda: on_event("dropped"))
        self.syntaxes = decodable_transfer_syntaxes()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self.spool.ensure()  # a link there is a start-up error (ConfigError)
        removed = self.spool.remove_stale_parts()
        if removed:
            logger.info("removed %d partly received file(s) left by a killed daemon", removed)
        quiet_pynetdicom()
        lim = self.limits
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = lim.acse_timeout
        ae.dimse_timeout = lim.dimse_timeout
        ae.network_timeout = lim.network_timeout
        ae.maximum_pdu_size = lim.max_pdu
        # pynetdicom's own count includes handed-over, not yet established connections;
        # the limits that matter are checked in _on_requested
        ae.maximum_associations = lim.max_associations + MAX_WAITING
        ae.require_calling_aet = []  # checked in _on_requested, which logs the refusal
        ae.add_supported_context(VERIFICATION)
        classes = list(RADIOGRAPH_SOP_CLASSES) + [
            str(cx.abstract_syntax)
            for cx in AllStoragePresentationContexts
            if str(cx.abstract_syntax) not in RADIOGRAPH_SOP_CLASSES
        ]
        for uid in classes:
            ae.add_supported_context(uid, self.syntaxes)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, lambda e: self.gate.opened(e.assoc)),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        try:
            server: Any = ae.make_server(
                (self.host, self.port),
                evt_handlers=handlers,
                server_class=GatedServer,
                gate=self.gate,
            )
        except OSError as exc:
            raise ConfigError(
                f"dicom_port {self.port}: cannot listen on {self.host}:{self.port} "
                f"({exc.strerror or exc})"
            ) from exc
        server.receiver = self  # what _part_file looks for
        server.contexts = SharedUIDContexts(server.contexts)  # copied per association
        ae._servers.append(server)  # as start_server does (shutdown() removes it)
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, name="xrwatch-dicom-accept", daemon=True
        )
        stream_to_spool(True)
        self.gate.start()
        self._thread.start()
        logger.info(
            "DICOM receiver %s listening on %s:%d%s (C-STORE, C-ECHO); callers allowed: %s%s; "
            "at most %d associations, %d per address",
            self.ae_title,
            self.host,
            self.port,
            " with TLS" if self.gate.ssl_context is not None else "",
            ", ".join(sorted(self.allow_ae)),
            f"; from {', '.join(map(str, self.allow_nets))}" if self.allow_nets else "",
            lim.max_associations,
            lim.max_per_host,
        )

    def stop(self) -> None:
        """Stop accepting, end every association (whatever the peers do), then return."""
        if self._server is not None:
            self._server.shutdown()  # stops accepting (the listening socket is closed)
            self._server = None
            self.gate.stop()
            self.receipts.close()
            stream_to_spool(False)

    def problems(self) -> list[str]:
        """What makes the receiver unhealthy (for ``/healthz``)."""
        if self._server is None:
            return []
        if not self.gate.alive() or (self._thread is not None and not self._thread.is_alive()):
            return ["the DICOM receiver stopped accepting connections"]
        lim = self.limits
        held = [p for p in self.gate.peers() if p.established is not None and p.killed is None]
        if len(held) < lim.max_associations:
            return []
        now = time.monotonic()
        stalled = 2 * lim.network_timeout
        if all(now - (p.last_done or p.established or now) > stalled for p in held):
            return [
                f"the DICOM receiver is wedged: all {lim.max_associations} association slots "
                f"held, none has completed a request for {stalled:g} s"
            ]
        return []

    # -- the spool's side of pynetdicom --------------------------------------------------
    def new_part(self, assoc: Any) -> PartFile | Refused:
        """Where the data set of the C-STORE now arriving on ``assoc`` streams to."""
        peer = self.gate.peer(assoc)
        limit = self.limits.max_object_bytes

        def over_limit(size: int) -> None:
            self.on_event("too_large")
            if peer is not None:
                self.gate.kill(peer, f"data set over max_file_mb ({limit} bytes): refused")

        try:
            part: PartFile | Refused = PartFile(self.spool, limit, over_limit)
        except OSError as exc:
            why = self.spool.refusal(exc)
            logger.error("DICOM receiver: %s", why)
            part = Refused(why)
        if peer is not None:
            peer.parts.append(part)
        return part

    # -- handlers ----------------------------------------------------------------------
    def _on_pdu(self, event: Any) -> None:
        peer = self.gate.peer(event.assoc)
        if peer is not None:
            peer.last_pdu = time.monotonic()

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        address = str(assoc.requestor.address)
        peer = self.gate.peer(assoc)
        if peer is not None:
            peer.calling_ae = calling
        reason, code = self._refusal(calling, called, address, peer)
        if reason:
            logger.warning(
                "refused DICOM association from AE %r at %s (called %r): %s",
                calling,
                address,
                called,
                reason,
            )
            self.on_event("rejected")
            assoc.acse.send_reject(*code)
            assoc.kill()  # waits until the rejection is on the wire (as pynetdicom's own does)

    def _refusal(
        self, calling: str, called: str, address: str, peer: Peer | None
    ) -> tuple[str, tuple[int, int, int]]:
        if called != self.ae_title:
            return f"called AE title is not ours ({self.ae_title!r})", (0x01, 0x01, 0x07)
        if calling not in self.allow_ae:
            return "calling AE title not in dicom_allow_ae", (0x01, 0x01, 0x03)
        if self.allow_nets:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                ip = None
            if ip is None or not any(ip in net for net in self.allow_nets):
                return "source address not in dicom_allow_hosts", (0x01, 0x01, 0x01)
        others = [  # established and not on their way out
            p
            for p in self.gate.peers()
            if p is not peer and p.established is not None and p.killed is None
        ]
        lim = self.limits
        if len(others) >= lim.max_associations:
            return f"{len(others)} associations open (dicom_max_associations)", (2, 3, 2)
        same = sum(1 for p in others if peer is not None and p.host == peer.host)
        if same >= lim.max_per_host:
            return f"{same} associations open from this address (dicom_max_per_host)", (2, 3, 2)
        return "", (0, 0, 0)

    def _on_established(self, event: Any) -> None:
        peer = self.gate.peer(event.assoc)
        if peer is None:
            return
        peer.established = time.monotonic()
        logger.info(
            "DICOM association from AE %r at %s:%s accepted (%d open)",
            peer.calling_ae,
            peer.address[0],
            peer.address[1],
            sum(1 for p in self.gate.peers() if p.established is not None),
        )

    def _on_echo(self, event: Any) -> int:
        peer = self.gate.peer(event.assoc)
        if peer is not None:
            peer.last_done = time.monotonic()
            peer.count("echoes")
        return SUCCESS

    def _on_store(self, event: Any) -> int | Dataset:
        peer = self.gate.peer(event.assoc)
        path = str(event.dataset_path)
        part = next((p for p in (peer.parts if peer else []) if p.name == path), None)
        if peer is not None:
            peer.busy += 1
        try:
            outcome, status = self._store(event, peer, part)
        except Exception as exc:  # a bug must not leave the sender without an answer
            logger.exception("C-STORE: unexpected error")
            outcome, status = "failed", _status(OUT_OF_RESOURCES, f"receiver error: {exc}")
        finally:
            if part is not None:
                part.discard()  # unless committed; pynetdicom's own unlink then finds nothing
                part.name = ""
                if peer is not None:
                    peer.parts.remove(part)
            if peer is not None:
                peer.busy -= 1
                peer.last_pdu = peer.last_done = time.monotonic()
        self.on_event(outcome)
        if peer is not None:
            peer.count(outcome)
        return status

    def _store(
        self, event: Any, peer: Peer | None, part: PartFile | Refused | None
    ) -> tuple[str, int | Dataset]:
        calling = peer.calling_ae if peer else "?"
        sop_class = str(event.context.abstract_syntax)
        sop_uid = _valid_uid(event.request.AffectedSOPInstanceUID)
        if part is None or isinstance(part, Refused):
            why = part.why if part is not None else "the data set was not received"
            return "failed", _status(OUT_OF_RESOURCES, why)
        try:
            part.close()  # writes what it gathered (xrwatch.dicom.spool.PartFile)
        except OSError as exc:  # e.g. the spool's disk is full: the sender may try again
            logger.error("C-STORE from AE %r: cannot store %s: %s", calling, sop_uid, exc)
            return "failed", _status(OUT_OF_RESOURCES, "cannot store the instance")
        header = self._read(part, str(event.context.transfer_syntax), sop_class)
        if header.problem is not None:
            logger.warning("C-STORE from AE %r failed: the instance is %s", calling, header.problem)
            return "failed", _status(CANNOT_UNDERSTAND, header.problem)
        study, series = _valid_uid(header.study), _valid_uid(header.series)
        if sop_uid is None or _valid_uid(header.sop_instance) != sop_uid or not study or not series:
            logger.warning(
                "C-STORE from AE %r refused: missing or invalid Study, Series or SOP Instance "
                "UID (or the SOP Instance UID differs from the request's)",
                calling,
            )
            return "failed", DATASET_MISMATCH
        name = UID(sop_class).name
        if header.own_output is not None:
            logger.info(
                "C-STORE from AE %r: %s %s was made by xrwatch (%s); acknowledged, not classified",
                calling,
                name,
                sop_uid,
                header.own_output,
            )
            return "own_output", SUCCESS
        if sop_class not in RADIOGRAPH_SOP_CLASSES and not self.accept_other:
            logger.info(
                "C-STORE from AE %r: %s %s is not a radiograph; acknowledged, not kept",
                calling,
                name,
                sop_uid,
            )
            self.on_ignored(name)
            return "ignored", SUCCESS
        return self._keep(part, calling, sop_uid, study, series)

    def _read(self, part: PartFile, transfer_syntax: str, sop_class: str) -> Any:
        fd = self.spool.read_part(part.part)
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fd).st_size
            return read_header(fh, size, transfer_syntax, image=sop_class in RADIOGRAPH_SOP_CLASSES)

    def _keep(
        self, part: PartFile, calling: str, sop_uid: str, study: str, series: str
    ) -> tuple[str, int | Dataset]:
        sha = part.sha256()
        filename = f"{sop_uid}.dcm"
        try:  # outside the lock: other associations' instances are synced meanwhile
            self._sync(part)
        except OSError as exc:
            logger.error("C-STORE from AE %r: cannot store %s: %s", calling, sop_uid, exc)
            return "failed", _status(OUT_OF_RESOURCES, "cannot store the instance")
        with self._lock:
            known = self.receipts.sha256(sop_uid)
            if known is None and (
                self.outbox.received_path(sop_uid) is not None
                or self.spool.exists(study, series, filename)
            ):
                known = sha  # kept before content was recorded: taken as the same
            if known == sha:
                logger.info(
                    "C-STORE from AE %r: instance %s was received before; acknowledged, "
                    "not processed again",
                    calling,
                    sop_uid,
                )
                return "duplicate", SUCCESS
            if known is not None:
                logger.warning(
                    "C-STORE from AE %r refused (0111): instance %s was received before "
                    "with other content (sha256 %s..., now %s...); a corrected image needs "
                    "a new SOP Instance UID",
                    calling,
                    sop_uid,
                    known[:12],
                    sha[:12],
                )
                comment = "SOP Instance UID received before with other content"
                return "conflict", _status(DUPLICATE_SOP_INSTANCE, comment)
            try:
                rel = self._commit(part, study, series, filename)
                self.receipts.record(sop_uid, sha, rel)
                self.outbox.record_received(sop_uid, rel, calling)
            except Exception as exc:  # disk full, a link in the way, ledger busy: retry
                logger.error("C-STORE from AE %r: cannot store %s: %s", calling, sop_uid, exc)
                return "failed", _status(OUT_OF_RESOURCES, "cannot store the instance")
        logger.info("received %s from AE %r", rel, calling)
        self.on_file(self.incoming / rel)
        return "stored", SUCCESS

    def _sync(self, part: PartFile) -> None:
        """The part's bytes on disk (before :meth:`_commit` gives them their name)."""
        fd = self.spool.read_part(part.part)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _commit(self, part: PartFile, study: str, series: str, filename: str) -> str:
        """Name the part (synced by :meth:`_sync`) durably: rename, folder fsync."""
        rel = self.spool.commit(part.part, study, series, filename)
        part.committed = True
        return rel
