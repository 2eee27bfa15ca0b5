"""Build each pending result's SR (and heatmap overlay SC) into ``REPORTS/dicom``.

Paths come only from validated UIDs (:func:`xrwatch.dicom.uids.path_part`: a UID that is
not one becomes a hash) and are checked to resolve under REPORTS: whatever a file dropped
into INCOMING carries in its header never names a place to write. A source whose UIDs are
not valid DICOM UIDs gets no SR at all (the SR would carry them into the PACS); it is
parked at once with the reason.

Each file is written atomically, read back with pydicom and only then queued for sending
(:meth:`xrwatch.dicom.outbox.Outbox.result_written`). A failure is logged once per item
and change of error (the first failure, a different error, the item parked, the item
written after failures), not once per attempt.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread

from xrwatch.atomic import write_atomic
from xrwatch.dicom.files import PART_SUFFIX
from xrwatch.dicom.outbox import DueResult, Outbox
from xrwatch.dicom.sc import build_sc
from xrwatch.dicom.sr import build_sr, not_attempted_reason
from xrwatch.dicom.uids import is_valid_uid, is_xrwatch_uid, path_part

logger = logging.getLogger(__name__)

SR_FOLDER = "dicom"  # REPORTS/dicom/<Study UID>/<source SOP UID>.SR.dcm (and .SC.dcm)
SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class Unbuildable(ValueError):
    """A source that can never give an SR (e.g. its UIDs are not UIDs): parked at once."""


def sr_relpath(record: dict[str, Any], source_sop_uid: str) -> str:
    """The SR's path in REPORTS, from the source's UIDs or, for one that is not a valid
    UID, from its hash: never a traversal, never an absolute path."""
    study = path_part(record.get("study_instance_uid") or "unknown")
    return f"{SR_FOLDER}/{study}/{path_part(source_sop_uid)}.SR.dcm"


def inside(root: Path, rel: str) -> Path:
    """``root / rel``, refused unless it resolves under ``root`` (links included)."""
    base = root.resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(base) or target == base:
        raise Unbuildable(f"{rel!r} does not resolve to a file under {base}")
    return target


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
    ) -> None:
        self.outbox = outbox
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
            except _Dropped as why:
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

    def _source(self, due: DueResult) -> Path | None:
        for candidate in (self.incoming / due.source_path, due.archived_to):
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        return None

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
        if is_xrwatch_uid(source.get("SOPInstanceUID")):
            raise _Dropped("the input is xrwatch's own output")
        if not_attempted_reason(item.record) and "Rows" not in source:
            raise _Dropped("the input is no image")
        for keyword in SOURCE_UIDS:
            if not is_valid_uid(source.get(keyword)):
                raise Unbuildable(f"its {keyword} is not a valid DICOM UID")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # highdicom's warnings quote patient names
            sr = build_sr(source, item.record, self.model_name, instance_number=item.file_id)
        rel = sr_relpath(item.record, item.source_sop_uid)
        written = [self._save(sr, rel, source)]
        png = self._heatmap(item, source)
        if png is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sha = str(item.record.get("model_sha256") or "")
                sc = build_sc(source, png, sha, instance_number=item.file_id)
            written.append(self._save(sc, rel.replace(".SR.dcm", ".SC.dcm"), source))
        return written

    def _heatmap(self, item: DueResult, source: Dataset) -> Path | None:
        """The overlay PNG to send as an SC: only for a judged input that has one."""
        heatmap = item.record.get("heatmap")
        if not heatmap or not_attempted_reason(item.record, source) is not None:
            return None
        try:
            png = inside(self.reports, str(heatmap))
        except Unbuildable as exc:  # never from the daemon; the overlay is optional
            logger.warning("%s: its heatmap %s; SR without overlay", item.source_path, exc)
            return None
        if not png.is_file():
            logger.warning("%s: its heatmap is gone; SR without overlay", item.source_path)
            return None
        return png

    def _save(self, ds: Dataset, rel: str, source: Dataset) -> tuple[str, str]:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        target = inside(self.reports, rel)
        write_atomic(target, buf.getvalue(), suffix=PART_SUFFIX)
        back = dcmread(target)  # validate: a PACS will read exactly these bytes
        if (
            back.SOPInstanceUID != ds.SOPInstanceUID
            or back.StudyInstanceUID != source.StudyInstanceUID
        ):
            raise ValueError(f"{target}: re-read instance does not match what was built")
        return str(ds.SOPInstanceUID), rel


class _Dropped(Exception):
    """No SR is due for this input after all."""
