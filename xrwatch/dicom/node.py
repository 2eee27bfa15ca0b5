"""The DICOM node of one ``xrwatch serve``: receiver, SR writer and sender, wired to the
daemon through its ledger (see :func:`attach`)."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from prometheus_client import Counter, Gauge

from xrwatch.dicom.outbox import Outbox, on_finish
from xrwatch.dicom.scp import Receiver, tls_context
from xrwatch.dicom.sender import ResultsWorker
from xrwatch.dicom.settings import ReceiverLimits, parse_destination

logger = logging.getLogger(__name__)

# stored: kept for classification; duplicate: the same bytes again (acknowledged);
# conflict: a known SOP Instance UID with other content (refused, 0111); ignored: not a
# radiograph (acknowledged, dropped); own_output: made by xrwatch (acknowledged, skipped);
# rejected: an association refused; dropped: a connection closed before any association;
# too_large: a data set over max_file_mb, refused while it streamed in; failed: the rest.
RECEIVE_OUTCOMES = (
    "stored", "duplicate", "conflict", "ignored", "own_output", "rejected", "dropped",
    "too_large", "failed",
)  # fmt: skip
GAUGE_SECONDS = 5.0


class DicomNode:
    """Started after the folder watch is live, stopped before the daemon drains."""

    def __init__(self, daemon: Any) -> None:
        cfg = daemon.config
        self.daemon = daemon
        # pynetdicom logs every PDU at DEBUG; the daemon's own lines say what matters.
        # highdicom logs at INFO every module it copies from a source.
        for name in ("pynetdicom", "highdicom"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.outbox = Outbox(daemon.ledger.path, owner=daemon.ledger.owner)
        self.outbox.create()
        registry = daemon.metrics.registry
        self.received = Counter(
            "xrwatch_dicom_received",
            "C-STORE requests and refused associations, by outcome",
            ["outcome"],
            registry=registry,
        )
        for outcome in RECEIVE_OUTCOMES:
            self.received.labels(outcome)
        self.ignored = Counter(
            "xrwatch_dicom_ignored",
            "Instances acknowledged and dropped because they are not radiographs, by SOP class",
            ["sop_class"],
            registry=registry,
        )
        self.own_output = Counter(
            "xrwatch_dicom_own_output",
            "Instances made by xrwatch (its SR or heatmap routed back), acknowledged and skipped",
            registry=registry,
        )
        self.sr_written = Counter(
            "xrwatch_dicom_sr_written", "DICOM SRs written to REPORTS/dicom", registry=registry
        )
        self.sent = Counter(
            "xrwatch_dicom_sent",
            "SRs acknowledged by a destination",
            ["destination"],
            registry=registry,
        )
        self.send_failures = Counter(
            "xrwatch_dicom_send_failures",
            "Failed C-STORE attempts, by destination",
            ["destination"],
            registry=registry,
        )
        self.pending = Gauge(
            "xrwatch_dicom_outbox_pending",
            "SRs waiting to be sent, by destination",
            ["destination"],
            registry=registry,
        )
        self.parked = Gauge(
            "xrwatch_dicom_outbox_parked",
            "Results given up on after the send attempts (dead letters), by destination",
            ["destination"],
            registry=registry,
        )
        destinations = [parse_destination(d) for d in cfg.dicom_destinations]
        for d in destinations:
            self.sent.labels(str(d))
            self.send_failures.labels(str(d))
        self.receiver: Receiver | None = None
        if cfg.dicom_port is not None:
            self.receiver = Receiver(
                incoming=daemon.incoming,
                outbox=Outbox(daemon.ledger.path, owner=daemon.ledger.owner, shared=True),
                ae_title=cfg.ae_title,
                host=cfg.dicom_host,
                port=cfg.dicom_port,
                allow_ae=cfg.dicom_allow_ae,
                allow_hosts=cfg.dicom_allow_hosts,
                accept_other=cfg.dicom_accept_other,
                limits=ReceiverLimits.from_config(cfg),
                ssl_context=(
                    tls_context(cfg.dicom_tls_cert, cfg.dicom_tls_key, cfg.dicom_tls_ca)
                    if cfg.dicom_tls_cert is not None and cfg.dicom_tls_key is not None
                    else None
                ),
                on_file=daemon.offer_complete,
                on_event=self._received,
                on_ignored=lambda sop_class: self.ignored.labels(sop_class).inc(),
            )
        self.worker = ResultsWorker(
            outbox=self.outbox,
            incoming=daemon.incoming,
            reports=cfg.reports,
            model_name=_model_name(daemon),
            ae_title=cfg.ae_title,
            destinations=destinations,
            timeout=cfg.dicom_send_timeout,
            max_attempts=cfg.dicom_send_attempts,
            retry=cfg.dicom_send_retry,
            on_written=self._written,
            on_sent=self._sent,
        )

    def _received(self, outcome: str) -> None:
        self.received.labels(outcome).inc()
        if outcome == "own_output":
            self.own_output.inc()

    def problems(self) -> list[str]:
        """The node's part of ``/healthz``: a wedged or dead receiver."""
        return self.receiver.problems() if self.receiver is not None else []

    def notes(self) -> list[str]:
        """What ``/healthz`` adds to ``ok`` (degraded, not down): unreachable destinations,
        parked results (:meth:`ResultsWorker.degraded`)."""
        return self.worker.degraded()

    def _written(self) -> None:
        self.sr_written.inc()

    def _sent(self, destination: str, ok: bool) -> None:
        (self.sent if ok else self.send_failures).labels(destination).inc()
        self.update_gauges()

    def update_gauges(self) -> None:
        for dest, counts in self.outbox.destination_counts().items():
            self.pending.labels(dest).set(counts["pending"])
            self.parked.labels(dest).set(counts["parked"])

    def start(self) -> None:
        self.outbox.release_dead_leases()
        self.update_gauges()
        if self.receiver is not None:
            self.receiver.start()
        self.worker.start()

    def on_finish(
        self, con: sqlite3.Connection, rows: list[tuple[int, str, dict[str, Any]]]
    ) -> None:
        """Ledger finish hook: queue the SRs with their outcomes, then wake the worker
        (which waits for this transaction's commit before it can read them)."""
        on_finish(con, rows)
        self.worker.wake.set()

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver.outbox.close()
        self.worker.stop()
        if self.daemon.config.once:  # no later start to finish them: do it now
            self.worker.finish_due()
        self.outbox.close()


def _model_name(daemon: Any) -> str:
    """The model file's name, with ``<arch>-<experiment>-<precision>`` when known."""
    meta = getattr(daemon.engine, "meta", None)
    name = getattr(meta, "name", None)
    source = getattr(daemon.engine, "path", daemon.config.model)  # Triton: triton:NAME@VERSION
    return f"{source.name} ({name})" if name else str(source.name)


def attach(daemon: Any) -> DicomNode:
    """Give ``daemon`` a DICOM node: a service, and a hook on the ledger's finish."""
    node = DicomNode(daemon)
    daemon.finish_hooks.append(node.on_finish)
    daemon.services.append(node)
    return node
