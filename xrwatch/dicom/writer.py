"""Build each pending result's SR (and heatmap overlay SC) into ``REPORTS/dicom``.

Paths come only from validated UIDs (:func:`xrwatch.dicom.uids.path_part`: a UID that is
not one becomes a hash) and are checked to resolve under REPORTS: whatever a file dropped
into INCOMING carries in its header never names a place to write. A source whose UIDs are
not valid DICOM UIDs gets no SR at all (the SR would carry them into the PACS); it is
parked at once with the reason.

The building itself (:func:`xrwatch.dicom.builder.build`) runs in the SR builder process
when the results worker has one (the daemon's does). Each file is written atomically, read
back with pydicom and only then queued for sending
(:meth:`xrwatch.dicom.outbox.Outbox.result_written`). A failure is logged once per item
and change of error (the first failure, a different error, the item parked, the item
written after failures), not once per attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xrwatch.dicom.builder import (
    BuilderProcess,
    BuildJob,
    Dropped,
    Unbuildable,
    build,
    inside,
)
from xrwatch.dicom.outbox import DueResult, Outbox
from xrwatch.dicom.uids import path_part

logger = logging.getLogger(__name__)

SR_FOLDER = "dicom"  # REPORTS/dicom/<Study UID>/<source SOP UID>.SR.dcm (and .SC.dcm)
__all__ = ["ResultWriter", "Unbuildable", "inside", "sr_relpath"]


def sr_relpath(record: dict[str, Any], source_sop_uid: str) -> str:
    """The SR's path in REPORTS, from the source's UIDs or, for one that is not a valid
    UID, from its hash: never a traversal, never an absolute path."""
    study = path_part(record.get("study_instance_uid") or "unknown")
    return f"{SR_FOLDER}/{study}/{path_part(source_sop_uid)}.SR.dcm"


class ResultWriter:
    """Builds the SRs that are due (called by the results worker's writer thread)."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        incoming: Path,
        reports: Path,
        model_name: str,
        destinations: list[str],
        on_written: Callable[[], None] = lambda: None,
        builder: BuilderProcess | None = None,
    ) -> None:
        self.outbox = outbox
        self.builder = builder  # None: built in the caller's thread
        self.incoming, self.reports = incoming, reports
        self.model_name = model_name
        self.destinations = destinations
        self.on_written = on_written

    def write_due(self) -> int:
        """Write the SRs that are due; return how many were handled."""
        due = self.outbox.take_results()
        for item in due:
            try:
                written = self._write(item)
            except Dropped as why:
                self.outbox.drop_result(item.file_id)
                logger.info("%s: no DICOM SR (%s)", item.source_path, why)
                continue
            except Exception as exc:
                self._failed(item, exc)
                continue
            self.outbox.result_written(item.file_id, written, self.destinations)
            if item.last_error:
                logger.info(
                    "%s: DICOM result written after %d failed attempts",
                    item.source_path,
                    item.attempts,
                )
            for _, rel in written:
                logger.info("%s: DICOM result written to %s", item.source_path, rel)
            self.on_written()
        return len(due)

    def _failed(self, item: DueResult, exc: Exception) -> None:
        error = str(exc) or type(exc).__name__
        attempts = item.attempts + 1
        state = self.outbox.result_failed(
            item.file_id, attempts, error, park=isinstance(exc, Unbuildable)
        )
        if state == "failed":
            logger.error(
                "%s: no DICOM SR, given up after %d attempts (parked; see status): %s",
                item.source_path,
                attempts,
                error,
            )
        elif error != item.last_error:
            logger.warning(
                "%s: cannot write its DICOM SR (attempt %d; retried with back-off, logged "
                "again only if the error changes): %s",
                item.source_path,
                attempts,
                error,
            )
        else:
            logger.debug(
                "%s: DICOM SR attempt %d failed again: %s", item.source_path, attempts, error
            )

    def _write(self, item: DueResult) -> list[tuple[str, str]]:
        """Write the SR (and the overlay SC); ``[(SOP Instance UID, path in REPORTS)]``."""
        job = BuildJob(
            sources=tuple(
                str(p) for p in (self.incoming / item.source_path, item.archived_to) if p
            ),
            source_sop_uid=item.source_sop_uid,
            record=item.record,
            model_name=self.model_name,
            instance_number=item.file_id,
            reports=str(self.reports),
            rel=sr_relpath(item.record, item.source_sop_uid),
        )
        built = self.builder.run(job) if self.builder is not None else build(job)
        for note in built.notes:
            logger.warning("%s: %s", item.source_path, note)
        return built.written
