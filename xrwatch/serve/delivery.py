"""Delivery: the reports written from the ledger, then the inputs archived.

Owns what happens to results once the ledger has them. :meth:`Delivery.flush` writes every
result the ledger has that is not in the reports yet (:meth:`ReportWriter.flush`); when
that fails, the results stay in the ledger and the flush is tried again with back-off
(``retry_at``), the failure shown by ``/healthz`` and the status line. Only once their
report rows are on disk are the inputs moved to the archive (``processed/`` or
``failed/``), and only the very file that was classified (:func:`move_to_archive`); a move
that fails is tried again on a later pass. A file already processed and seen again has its
JSON rewritten when it describes another content than the last one seen under its name.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from xrwatch.errors import ReportWriteError
from xrwatch.serve.archive import move_to_archive
from xrwatch.serve.config import ServeConfig
from xrwatch.serve.intake import Work
from xrwatch.serve.ledger import Ledger
from xrwatch.serve.liveness import RETRY_MAX_SECONDS, Standing
from xrwatch.serve.metrics import Metrics
from xrwatch.serve.reports import ReportWriter
from xrwatch.serve.stability import StabilityTracker

logger = logging.getLogger(__name__)

HELD_RETRY_SECONDS = 60.0  # a row whose report could not be written is tried again after this


class Delivery:
    """Writes the reports and archives the inputs of one daemon."""

    def __init__(
        self,
        config: ServeConfig,
        incoming: Path,
        writer: ReportWriter,
        ledger: Ledger,
        tracker: StabilityTracker,
        standing: Standing,
        metrics: Metrics,
        progress: Callable[[], None],
    ) -> None:
        self.config = config
        self.incoming = incoming
        self.writer = writer
        self.ledger = ledger
        self.tracker = tracker
        self.standing = standing
        self.metrics = metrics
        self._progress = progress
        self.retry_at = 0.0  # when a failed flush is tried again; 0: none failed
        self.failures = 0  # report writes failed in a row
        self._backoff = 1.0
        self._pending_archive: list[tuple[Work, bool]] = []  # (work, ok)

    def archive_later(self, work: Work, ok: bool) -> None:
        """Archive ``work``'s file once its report row is on disk (when archiving is on)."""
        if self.config.archive is not None:
            self._pending_archive.append((work, ok))

    def seen_again(self, work: Work) -> None:
        """A file already processed (``work.kind == "done"``) was found again."""
        if work.refresh is not None:
            # A, then B, then A again under one name: the JSON describes A again
            try:
                self.writer.refresh_json(work.rel, work.refresh)
            except ReportWriteError as exc:
                logger.error("%s: %s", work.rel, exc)
        if self.config.archive is not None:
            logger.info("%s: already processed (%s); archiving", work.rel, work.done_state)
            self._pending_archive.append((work, work.done_state == "ok"))
            self.archive_pending()

    def own_output(self, work: Work) -> None:
        """``work`` (kind ``own_output``) was made by xrwatch: never classified, no report
        row; counted, and archived to ``processed/`` (it was handled) when archiving is on."""
        logger.info("%s: skipped: made by xrwatch (%s); not classified", work.rel, work.error)
        self.metrics.own_output.inc()
        if self.config.archive is not None:
            self._pending_archive.append((work, True))
            self.archive_pending()

    def flush(self) -> None:
        try:
            rows = self.writer.flush(
                self.ledger, hold_seconds=HELD_RETRY_SECONDS, progress=self._progress
            )
        except (ReportWriteError, sqlite3.Error) as exc:
            logger.error("reports not written, will retry: %s", exc)
            self.standing.report_error = str(exc)
            self.failures += 1
            self.metrics.report_write_failures.inc()
            self.retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RETRY_MAX_SECONDS)
            self.count_unreported()
            return
        self.standing.report_error = None
        self.failures = 0
        self.retry_at = 0.0
        self._backoff = 1.0
        self.count_unreported()
        now = time.time()
        for row in rows:
            self.metrics.files.labels(row.state).inc()
            if row.record.get("flag"):
                self.metrics.flagged.labels(row.record["flag"]).inc()
            detected = row.record.get("detected_at")
            if detected:
                seen = datetime.fromisoformat(str(detected).replace("Z", "+00:00")).timestamp()
                self.metrics.latency.observe(max(0.0, now - seen))
        self.archive_pending()

    def archive_pending(self) -> None:
        if self.config.archive is None or self.retry_at:
            return  # archive only once the report rows are on disk
        pending, self._pending_archive = self._pending_archive, []
        for work, ok in pending:
            rel, path = work.rel, work.cand.path
            if work.fid is None:
                continue  # a folder: reported, left where it is
            try:
                dest = move_to_archive(
                    self.incoming, work.parts, work.fid, self.config.archive, rel, ok
                )
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    logger.warning(
                        "%s: not archived: a folder on its path is now a symbolic link", rel
                    )
                    continue
                logger.error("%s: cannot move to the archive (%s); will retry", rel, exc)
                self.tracker.offer(path, delay=self.config.rescan_interval)
                continue
            if dest is None:
                logger.warning(
                    "%s: not archived: the name now holds another file than the one "
                    "classified; that one is processed on its own",
                    rel,
                )
                self.tracker.offer(path)
                continue
            logger.info("%s: moved to %s", rel, dest)
            if not work.row_id:
                continue  # no ledger row (xrwatch's own output): nothing to record
            try:
                self.ledger.set_archived(work.row_id, str(dest))
            except sqlite3.Error as exc:  # only bookkeeping: the move itself is done
                logger.error("%s: cannot record the archive path: %s", rel, exc)

    def count_unreported(self) -> None:
        try:
            unreported, held = self.ledger.unreported_counts()
        except sqlite3.Error:
            return
        self.standing.unreported, self.standing.held = unreported, held
        self.metrics.unreported.set(unreported)
