"""Reports: ``predictions.csv`` (one row per file) and ``json/<relative path>.json``.

The ledger is the source of truth; reports are written from it. Appends happen under an
exclusive ``flock`` (two daemons may share a reports dir) in three steps: the ledger marks
the rows *being reported* together with the CSV offset where the append starts; the rows
are appended and fsynced; the ledger marks them reported. A writer killed between the
steps leaves the mark behind, and the next writer (holding the lock, so the killed one is
certainly not writing) truncates the CSV back to the recorded offset and writes the rows
again. Hence: every finished file has exactly one CSV row, and no line is ever torn.

JSON files are written atomically (temp file, fsync, rename) before the CSV row.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xrwatch.errors import ReportWriteError
from xrwatch.fields import DICOM_IDS
from xrwatch.serve.ledger import Finished, Ledger

logger = logging.getLogger(__name__)

CSV_NAME = "predictions.csv"
UID_COLUMNS = DICOM_IDS


def csv_columns(classes: list[str]) -> list[str]:
    """The CSV header for a model with these classes."""
    return [
        "processed_at",
        "file",
        "sha256",
        "status",
        "label",
        "confidence",
        *[f"prob_{c}" for c in classes],
        "error",
        "model_sha256",
        "provider",
        *UID_COLUMNS,
        "kind",
        "modality",
        "width",
        "height",
    ]


# A spreadsheet takes a cell starting with one of these for a formula (OWASP, "CSV
# Injection"): such text cells get a leading single quote, shown as text by Excel/LibreOffice.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """One CSV cell: '' for None, floats to 6 decimals, never a line break (one row, one line).

    Text (file names, DICOM values) that a spreadsheet would run as a formula is prefixed
    with ``'``; numbers are written as numbers. The JSON reports keep the exact text.
    """
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, (int, bool)):
        return str(value)
    text = str(value)
    if text.startswith(FORMULA_STARTS):
        text = "'" + text
    # One row per line, always: no embedded line breaks.
    return text.replace("\r", " ").replace("\n", " ")


def csv_row(record: dict[str, Any], columns: list[str]) -> list[str]:
    probs = record.get("probabilities") or {}
    row = []
    for col in columns:
        if col.startswith("prob_"):
            row.append(csv_cell(probs.get(col[5:])))
        else:
            row.append(csv_cell(record.get(col)))
    return row


def json_path(reports: Path, rel: str) -> Path:
    """``REPORTS/json/<relative path>.json``: keeps subfolders, so names never collide."""
    return reports / "json" / (rel + ".json")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ReportWriter:
    """Writes ledger outcomes into the CSV and JSON reports, exactly once each."""

    def __init__(self, reports: Path, classes: list[str]) -> None:
        self.reports = Path(reports)
        self.columns = csv_columns(classes)
        self.csv_path = self.reports / CSV_NAME
        self._lock_path = self.reports / ".predictions.lock"

    def check_writable(self) -> None:
        """Fail at start, clearly, when the reports folder cannot be written."""
        try:
            self.reports.mkdir(parents=True, exist_ok=True)
            probe = self.reports / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
            with self._locked():
                pass
        except OSError as exc:
            raise ReportWriteError(
                f"{self.reports}: reports folder is not writable ({exc.strerror or exc})"
            ) from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _recover(self, ledger: Ledger) -> None:
        pending = ledger.pending_report()
        if pending is not None:
            csv_name, offset = pending
            target = Path(csv_name)
            if target.exists() and target.stat().st_size > offset:
                logger.warning(
                    "undoing an incomplete report append in %s (a writer was killed): "
                    "truncating to %d bytes and writing its rows again",
                    target,
                    offset,
                )
                os.truncate(target, offset)
            ledger.reset_reporting()
        self._repair_tail()

    def _repair_tail(self) -> None:
        """Drop a torn last line (no newline), which only an outside writer can leave."""
        if not self.csv_path.exists():
            return
        with self.csv_path.open("rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return
            pos = size
            while pos > 0:
                step = min(65536, pos)
                fh.seek(pos - step)
                chunk = fh.read(step)
                idx = chunk.rfind(b"\n")
                if idx >= 0:
                    pos = pos - step + idx + 1
                    break
                pos -= step
            logger.warning("%s: removing a torn last line (%d bytes)", self.csv_path, size - pos)
            fh.truncate(pos)

    def _ensure_header(self) -> None:
        header = ",".join(self.columns)
        if self.csv_path.exists() and self.csv_path.stat().st_size > 0:
            with self.csv_path.open(encoding="utf-8", newline="") as fh:
                existing = fh.readline().rstrip("\r\n")
            if existing == header:
                return
            n = 1
            while (old := self.csv_path.with_name(f"predictions.{n}.csv")).exists():
                n += 1
            logger.warning(
                "%s has other columns (a different model?); moved it to %s and starting a new one",
                self.csv_path,
                old.name,
            )
            os.replace(self.csv_path, old)
        with self.csv_path.open("a", encoding="utf-8", newline="") as fh:
            fh.write(header + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def flush(self, ledger: Ledger) -> list[Finished]:
        """Write every finished-but-unreported ledger row; return the rows written.

        Raises :class:`ReportWriteError` (rows stay unreported and are retried later).
        """
        try:
            self.reports.mkdir(parents=True, exist_ok=True)  # recreated if someone removed it
            with self._locked():
                self._recover(ledger)
                rows = ledger.unreported()
                if not rows:
                    return []
                self._ensure_header()
                dirs: set[Path] = set()
                for row in rows:
                    target = json_path(self.reports, row.path)
                    write_json_atomic(target, row.record)
                    dirs.add(target.parent)
                for d in dirs:
                    _fsync_dir(d)
                buf = io.StringIO()
                writer = csv.writer(buf, lineterminator="\n")
                for row in rows:
                    writer.writerow(csv_row(row.record, self.columns))
                data = buf.getvalue().encode("utf-8")
                ids = [r.id for r in rows]
                offset = self.csv_path.stat().st_size
                ledger.mark_reporting(ids, str(self.csv_path), offset)
                try:
                    with self.csv_path.open("ab") as fh:
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
                except OSError:
                    with contextlib.suppress(OSError):
                        os.truncate(self.csv_path, offset)
                        ledger.reset_reporting()
                    raise
                ledger.mark_reported(ids)
                return rows
        except OSError as exc:
            raise ReportWriteError(
                f"{self.reports}: cannot write reports ({exc.strerror or exc}); "
                "outcomes are kept in the ledger and will be written on the next try"
            ) from exc


def read_csv(path: Path) -> list[dict[str, str]]:
    """Parse a predictions.csv (used by tests, ``status`` and the demo)."""
    with Path(path).open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))
