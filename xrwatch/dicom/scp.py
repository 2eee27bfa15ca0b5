"""The receiver: a pynetdicom C-STORE/C-ECHO SCP that spools instances into INCOMING.

Each instance is written, exactly as received (file meta + the bytes of the data set in
the negotiated transfer syntax), to ``INCOMING/dicom/<Study UID>/<Series UID>/<SOP UID>.dcm``:
paths are made of UIDs only, never of patient data. The C-STORE is acknowledged only after
the file is fsynced and renamed into place and its SOP Instance UID is in the ledger's
``dicom_received`` table; from there the daemon's usual path (watcher, claim, classify,
record) takes over, so a received instance has the folder's guarantees.

An instance whose SOP Instance UID was received before is acknowledged (success: the
sender must not retry) but not written again, so it is never classified twice.

Access control happens at association: a calling AE title outside ``dicom_allow_ae``, or a
source address outside ``dicom_allow_hosts`` (when set), is rejected (A-ASSOCIATE-RJ,
"calling AE title not recognised"). The log names the AE title and address only.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt

from xrwatch.atomic import write_atomic
from xrwatch.dicom.files import PART_SUFFIX, remove_stale_parts
from xrwatch.dicom.outbox import Outbox
from xrwatch.errors import ConfigError

logger = logging.getLogger(__name__)

SPOOL = "dicom"  # subfolder of INCOMING the receiver writes into

# Projection radiography: what the classifier reads.
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}

VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO

# DIMSE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data the installed pydicom plugins decode."""
    from pydicom.pixels import get_decoder
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS

    return [str(uid) for uid in _PIXEL_DATA_DECODERS if get_decoder(uid).is_available]


def _valid_uid(value: Any) -> str | None:
    text = str(value or "").strip()
    if text and UID(text).is_valid and ".." not in text:
        return text
    return None


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
        on_file: Callable[[Path], None] = lambda _p: None,
        on_event: Callable[[str], None] = lambda _e: None,
    ) -> None:
        self.incoming = incoming
        self.spool = incoming / SPOOL
        self.outbox = outbox
        self.ae_title = ae_title
        self.host, self.port = host, port
        self.allow_ae = {a.strip() for a in allow_ae}
        self.allow_nets = [ipaddress.ip_network(h, strict=False) for h in allow_hosts]
        self.accept_other = accept_other
        self.on_file = on_file
        self.on_event = on_event  # metrics: 'stored', 'duplicate', 'refused', 'failed', 'rejected'
        self._lock = threading.Lock()  # one SOP Instance UID is never written twice at once
        self._server: Any = None
        self.syntaxes = decodable_transfer_syntaxes()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        removed = remove_stale_parts(self.spool)
        if removed:
            logger.info("removed %d partly received file(s) left by a killed daemon", removed)
        ae = AE(ae_title=self.ae_title)
        ae.require_calling_aet = []  # checked in _on_requested, which logs the refusal
        ae.add_supported_context(VERIFICATION)
        if self.accept_other:
            others = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
            classes = list(RADIOGRAPH_SOP_CLASSES) + [
                uid for uid in others if uid not in RADIOGRAPH_SOP_CLASSES
            ]
        else:
            classes = list(RADIOGRAPH_SOP_CLASSES)
        for uid in classes:
            ae.add_supported_context(uid, self.syntaxes)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, lambda _event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
        ]
        try:
            self._server = ae.start_server(
                (self.host, self.port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            raise ConfigError(
                f"dicom_port {self.port}: cannot listen on {self.host}:{self.port} "
                f"({exc.strerror or exc})"
            ) from exc
        self.port = int(self._server.server_address[1])
        logger.info(
            "DICOM receiver %s listening on %s:%d (C-STORE, C-ECHO); callers allowed: %s%s",
            self.ae_title,
            self.host,
            self.port,
            ", ".join(sorted(self.allow_ae)),
            f"; from {', '.join(map(str, self.allow_nets))}" if self.allow_nets else "",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # stops accepting; waits for associations in progress
            self._server = None

    # -- handlers ----------------------------------------------------------------------
    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        reason = ""
        if calling not in self.allow_ae:
            reason = "calling AE title not in dicom_allow_ae"
        elif self.allow_nets:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                ip = None
            if ip is None or not any(ip in net for net in self.allow_nets):
                reason = "source address not in dicom_allow_hosts"
        if reason:
            logger.warning(
                "refused DICOM association from AE %r at %s: %s", calling, address, reason
            )
            self.on_event("rejected")
            assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected permanent, AE not recognised
            assoc.kill()  # waits until the rejection is on the wire (as pynetdicom's own does)

    def _on_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_class = str(event.context.abstract_syntax)
        sop_uid = _valid_uid(event.request.AffectedSOPInstanceUID)
        if sop_class not in RADIOGRAPH_SOP_CLASSES and not self.accept_other:
            self.on_event("refused")
            return SOP_CLASS_NOT_SUPPORTED
        try:
            ds = event.dataset
            study = _valid_uid(ds.get("StudyInstanceUID"))
            series = _valid_uid(ds.get("SeriesInstanceUID"))
            ds_sop = _valid_uid(ds.get("SOPInstanceUID"))
        except Exception as exc:  # a malformed data set
            logger.warning("C-STORE from AE %r: data set cannot be parsed (%s)", calling, exc)
            self.on_event("failed")
            return CANNOT_UNDERSTAND
        if sop_uid is None or ds_sop != sop_uid or study is None or series is None:
            logger.warning(
                "C-STORE from AE %r refused: missing or invalid Study, Series or SOP Instance "
                "UID (or the SOP Instance UID differs from the request's)",
                calling,
            )
            self.on_event("failed")
            return DATASET_MISMATCH
        rel = f"{SPOOL}/{study}/{series}/{sop_uid}.dcm"
        target = self.incoming / rel
        try:
            with self._lock:
                if self.outbox.received_path(sop_uid) is not None or target.exists():
                    logger.info(
                        "C-STORE from AE %r: instance %s was received before; acknowledged, "
                        "not processed again",
                        calling,
                        sop_uid,
                    )
                    self.on_event("duplicate")
                    return SUCCESS
                write_atomic(target, event.encoded_dataset(), suffix=PART_SUFFIX)
                self.outbox.record_received(sop_uid, rel, calling)
        except Exception as exc:  # disk full, permissions, ledger busy: the sender retries
            logger.error("C-STORE from AE %r: cannot store %s: %s", calling, rel, exc)
            self.on_event("failed")
            return OUT_OF_RESOURCES
        logger.info("received %s from AE %r", rel, calling)
        self.on_event("stored")
        self.on_file(target)
        return SUCCESS
