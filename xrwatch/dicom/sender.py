"""Results as DICOM: build each pending SR into ``REPORTS/dicom``, then C-STORE it to every
configured destination, from the ledger's ``dicom_results`` and ``dicom_outbox`` tables.

One background thread does both, so the daemon's loop never waits for the network. An SR
is written (temp file, fsync, rename), re-read with pydicom to check it, and only then
queued for sending; a send is marked ``sent`` only after the destination acknowledged it,
and failures wait with back-off (recorded in the ledger, so it holds across restarts).
A daemon killed between the acknowledgement and the mark sends the SR once more after the
restart: with the same SOP Instance UID (see :mod:`xrwatch.dicom.sr`), so the PACS still
holds one SR per source instance.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from xrwatch.atomic import write_atomic
from xrwatch.dicom.files import PART_SUFFIX
from xrwatch.dicom.outbox import DueResult, Outbox
from xrwatch.dicom.sc import build_sc
from xrwatch.dicom.settings import Destination
from xrwatch.dicom.sr import build_sr

logger = logging.getLogger(__name__)

SR_FOLDER = "dicom"  # REPORTS/dicom/<Study UID>/<source SOP UID>.SR.dcm
IDLE_SECONDS = 1.0  # how often an idle worker looks for new work
# Fault injection for the exactly-once test: die right after a destination acknowledged a
# C-STORE and before the ledger records it (the window in which an SR could be sent twice).
_FAULT_ENV = "XRWATCH_DICOM_FAULT"


def sr_relpath(record: dict[str, Any], source_sop_uid: str) -> str:
    return f"{SR_FOLDER}/{record.get('study_instance_uid') or 'unknown'}/{source_sop_uid}.SR.dcm"


def send_datasets(
    dest: Destination, ae_title: str, paths: list[Path], timeout: float = 30.0
) -> list[tuple[bool, str]]:
    """C-STORE each file to ``dest`` over one association; ``(acknowledged, detail)`` each.

    Raises ConnectionError when no association can be established.
    """
    from pynetdicom import AE

    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"{dest}: association rejected or no answer")
    results: list[tuple[bool, str]] = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                results.append((False, "no response (connection lost or timed out)"))
                if not assoc.is_established:
                    break
            elif code == 0x0000 or 0xB000 <= code <= 0xB0FF:  # success or warning
                results.append((True, f"status 0x{code:04X}"))
            else:
                results.append((False, f"refused with status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    results += [(False, "association ended early")] * (len(datasets) - len(results))
    return results


class ResultsWorker:
    """The background thread that writes SRs and drains the outbox."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        incoming: Path,
        reports: Path,
        model_name: str,
        ae_title: str,
        destinations: list[Destination],
        on_written: Callable[[], None] = lambda: None,
        on_sent: Callable[[str, bool], None] = lambda _d, _ok: None,
    ) -> None:
        self.outbox = outbox
        self.incoming, self.reports = incoming, reports
        self.model_name = model_name
        self.ae_title = ae_title
        self.destinations = destinations
        self.on_written, self.on_sent = on_written, on_sent
        self._stop = threading.Event()
        self.wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xrwatch-dicom-out", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                busy = self.write_due() > 0
                for dest in self.destinations:
                    if self._stop.is_set():
                        break
                    busy = self.send_due(dest) > 0 or busy
            except Exception:  # the ledger busy or broken: log, wait, retry
                logger.exception("DICOM results worker failed; retrying")
            if not busy:
                self.wake.wait(IDLE_SECONDS)
                self.wake.clear()

    def finish_due(self) -> None:
        """Write and send what is due now, on the caller's thread (``--once``); what
        fails waits for its back-off, i.e. for the next start."""
        while self.write_due():
            pass
        for dest in self.destinations:
            while self.send_due(dest):
                pass

    # -- SRs ---------------------------------------------------------------------------
    def _source(self, due: DueResult) -> Path | None:
        for candidate in (self.incoming / due.source_path, due.archived_to):
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        return None

    def write_due(self) -> int:
        """Write the SRs that are due; return how many were handled."""
        due = self.outbox.take_results()
        for item in due:
            try:
                written = self._write(item)
            except Exception as exc:
                attempts = item.attempts + 1
                logger.error(
                    "%s: cannot write its DICOM SR (attempt %d): %s",
                    item.source_path,
                    attempts,
                    exc,
                )
                self.outbox.result_failed(item.file_id, attempts, str(exc))
                continue
            self.outbox.result_written(item.file_id, written, [str(d) for d in self.destinations])
            for _, rel in written:
                logger.info("%s: DICOM result written to %s", item.source_path, rel)
            self.on_written()
        return len(due)

    def _write(self, item: DueResult) -> list[tuple[str, str]]:
        """Write the SR (and the overlay SC); ``[(SOP Instance UID, path in REPORTS)]``."""
        source_path = self._source(item)
        if source_path is None:
            raise FileNotFoundError(
                "the source file is no longer in INCOMING or the archive; its header "
                "(patient and study) is needed for the SR"
            )
        source = dcmread(source_path, force=True, stop_before_pixels=True)
        if str(source.get("SOPInstanceUID", "")) != item.source_sop_uid:
            raise ValueError("the file at this path is no longer the instance classified")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # highdicom's warnings quote patient names
            sr = build_sr(source, item.record, self.model_name)
        rel = sr_relpath(item.record, item.source_sop_uid)
        written = [self._save(sr, rel, source)]
        heatmap = item.record.get("heatmap")
        if heatmap:
            png = self.reports / str(heatmap)
            if png.is_file():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sc = build_sc(source, png, str(item.record.get("model_sha256") or ""))
                written.append(self._save(sc, rel.replace(".SR.dcm", ".SC.dcm"), source))
            else:
                logger.warning("%s: its heatmap is gone; SR without overlay", item.source_path)
        return written

    def _save(self, ds: Any, rel: str, source: Any) -> tuple[str, str]:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        target = self.reports / rel
        write_atomic(target, buf.getvalue(), suffix=PART_SUFFIX)
        back = dcmread(target)  # validate: a PACS will read exactly these bytes
        if (
            back.SOPInstanceUID != ds.SOPInstanceUID
            or back.StudyInstanceUID != source.StudyInstanceUID
        ):
            raise ValueError(f"{target}: re-read instance does not match what was built")
        return str(ds.SOPInstanceUID), rel

    # -- sends -------------------------------------------------------------------------
    def send_due(self, dest: Destination) -> int:
        """Send what is due to ``dest``; return how many sends were tried."""
        due = self.outbox.take_sends(str(dest))
        if not due:
            return 0
        try:
            results = send_datasets(dest, self.ae_title, [self.reports / d.sr_path for d in due])
        except Exception as exc:  # refused, unreachable, SR file unreadable
            results = [(False, str(exc) or type(exc).__name__)] * len(due)
        for item, (ok, detail) in zip(due, results, strict=True):
            if ok:
                if os.environ.get(_FAULT_ENV) == "kill-after-send":
                    os.kill(os.getpid(), signal.SIGKILL)
                self.outbox.sent(item.id)
                logger.info("SR %s sent to %s (%s)", item.sr_sop_uid, dest, detail)
            else:
                wait = self.outbox.send_failed(item.id, item.attempts + 1, detail)
                logger.warning(
                    "SR %s not sent to %s (%s); retrying in %.0f s",
                    item.sr_sop_uid,
                    dest,
                    detail,
                    wait,
                )
            self.on_sent(str(dest), ok)
        return len(due)


def echo(dest: Destination, ae_title: str, timeout: float = 10.0) -> tuple[bool, str]:
    """C-ECHO ``dest`` as ``ae_title``: ``(answered with success, what happened)``."""
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
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
