"""Reports: ``predictions.csv`` (one row per file) and ``json/<relative path>.json``.

The ledger is the source of truth; reports are written from it. Appends happen under an
exclusive ``flock`` (two daemons may share a reports dir) in three steps: the ledger marks
the rows *being reported* together with the CSV offset where the append starts; the rows
are appended and fsynced; the ledger marks them reported. A writer killed between the
steps leaves the mark behind, and the next writer (holding the lock, so the killed one is
certainly not writing) truncates the CSV back to the recorded offset and writes the rows
again. Hence: every finished file has exactly one CSV row, and no line is ever torn.

JSON files are written atomically (temp file, fsync, rename; a flush's files together, with
one wait for the disk: ``xrwatch.atomic.replace_all``) before the CSV row.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from xrwatch.atomic import MAX_OPEN, make_dirs, replace_all, write_atomic
from xrwatch.errors import ReportWriteError
from xrwatch.fields import DICOM_IDS, EXPLANATION, FLAG
from xrwatch.safetext import printable
from xrwatch.serve.ledger import Finished, Ledger

logger = logging.getLogger(__name__)

CSV_NAME = "predictions.csv"
UID_COLUMNS = DICOM_IDS


# the flag next to the label it qualifies (read together); its reason with the others
COLUMNS_BEFORE = ("processed_at", "file", "sha256", "status", "label", FLAG, "confidence")
COLUMNS_AFTER = (
    "error", "model", "model_sha256", "provider", *UID_COLUMNS, "kind", "modality", "width",
    "height", *(c for c in EXPLANATION if c != FLAG),
)  # fmt: skip


def csv_columns(classes: list[str]) -> list[str]:
    """The CSV header for a model with these classes: ``prob_<class>`` between the label and
    the error. Class names come from the model file, so control characters in them (a
    terminal escape) are written as ``\\xNN``, like those of file names."""
    return [*COLUMNS_BEFORE, *[f"prob_{printable(c)}" for c in classes], *COLUMNS_AFTER]


def csv_line(cells: list[str]) -> str:
    """One CSV line (no line break) of ``cells``, quoted where CSV needs it."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue().removesuffix("\n")


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
    # One row per line, always: no embedded line breaks; other control characters (a
    # terminal escape in a class name or a DICOM value) written as \xNN.
    return printable(text.replace("\r", " ").replace("\n", " "))


def csv_row(record: dict[str, Any], classes: list[str]) -> list[str]:
    """The cells of ``record``, in the order of :func:`csv_columns` for ``classes``."""
    probs = record.get("probabilities") or {}
    return [
        *(csv_cell(record.get(col)) for col in COLUMNS_BEFORE),
        *(csv_cell(probs.get(c)) for c in classes),
        *(csv_cell(record.get(col)) for col in COLUMNS_AFTER),
    ]


# -- JSON report names: safe by construction ----------------------------------------------
# A report name is the input's relative path plus ".json", folders kept, unless a component
# would be unsafe; then that component becomes "<first bytes>~<32 hex of its sha256>":
# - a file name whose ".json" name would exceed NAME_MAX (255 bytes);
# - a folder named "*.json", which would collide with the report of a file beside it
#   ("x" -> "x.json" versus "x.json/y" -> "x.json/y.json");
# - any name that already looks hashed ("*~<32 hex>"), so that no plain name can equal a
#   hashed one.
# Names are thus distinct for distinct inputs, and no report file is ever a report folder.
# A path deeper than JSON_MAX_DEPTH folders, or whose report path would come near PATH_MAX,
# is stored flat: "json/~<hash of the whole path>/<its file name>.json".
NAME_MAX = 255
PATH_BUDGET = 4000  # bytes of an absolute report path (PATH_MAX is 4096 on Linux)
JSON_MAX_DEPTH = 32  # folders kept in json/ below which a report is stored flat
_KEEP = 100  # bytes of a long or unsafe name kept, for people, before its hash
_HASHED = re.compile(r"~[0-9a-f]{32}$")


def _digest(kind: str, text: str) -> str:
    data = kind.encode() + b"\0" + os.fsencode(text)
    return hashlib.sha256(data).hexdigest()[:32]


def _hashed(kind: str, name: str) -> str:
    keep = os.fsencode(name)[:_KEEP].decode("utf-8", "ignore")  # a whole-character prefix
    return f"{keep}~{_digest(kind, name)}"


def _file_name(name: str) -> str:
    if len(os.fsencode(name)) + 5 > NAME_MAX or _HASHED.search(name):
        return _hashed("file", name) + ".json"
    return name + ".json"


def _folder_name(name: str) -> str:
    if name.endswith(".json") or _HASHED.search(name) or len(os.fsencode(name)) > NAME_MAX:
        return _hashed("folder", name)
    return name


def json_path(reports: Path, rel: str) -> Path:
    """Where the JSON report of INCOMING/``rel`` goes: ``REPORTS/json/<rel>.json``, with
    unsafe components hashed (see above); distinct inputs never share a report path."""
    parts = [p for p in rel.split("/") if p]
    base = reports / "json"
    name = _file_name(parts[-1]) if parts else _hashed("file", rel) + ".json"
    folders = [_folder_name(p) for p in parts[:-1]]
    path = base.joinpath(*folders, name)
    if len(folders) > JSON_MAX_DEPTH or len(os.fsencode(str(path))) > PATH_BUDGET:
        return base / ("~" + _digest("path", rel)) / name
    return path


def _json_bytes(data: dict[str, Any]) -> bytes:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    # backslashreplace: a name that is not UTF-8 becomes a \udcXX escape, still JSON
    return text.encode("utf-8", errors="backslashreplace")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, _json_bytes(data))


class ReportWriter:
    """Writes ledger outcomes into the CSV and JSON reports, exactly once each."""

    def __init__(self, reports: Path, classes: list[str]) -> None:
        self.reports = Path(reports)
        self.classes = list(classes)
        self.columns = csv_columns(self.classes)
        self.csv_path = self.reports / CSV_NAME
        self._lock_path = self.reports / ".predictions.lock"
        self._writers_fd: int | None = None

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

    def claim_for_model(self, model: Path, model_sha256: str) -> None:
        """Refuse to share this reports folder with a running daemon of another model.

        Every daemon writing here holds a shared ``flock`` on ``.writers.lock`` while it
        runs; the first one records its model in ``.writers.json``. A daemon whose model
        differs from the one recorded while others hold the lock is refused (ConfigError):
        two models on one folder would interleave rows with different columns.
        """
        from xrwatch.errors import ConfigError

        lock_path = self.reports / ".writers.lock"
        info_path = self.reports / ".writers.json"
        mine = {"model": str(model), "model_sha256": model_sha256, "pid": os.getpid()}
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with self._locked():  # one daemon at a time gets here
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    alone = True
                except BlockingIOError:
                    alone = False
                if alone:
                    write_json_atomic(info_path, mine)
                else:
                    try:
                        other = json.loads(info_path.read_text(encoding="utf-8"))
                    except (OSError, ValueError):
                        other = {}
                    if other.get("model_sha256") not in (None, model_sha256):
                        raise ConfigError(
                            f"{self.reports}: another xrwatch daemon (pid {other.get('pid')}) "
                            f"writes reports here with model {other.get('model')} (sha256 "
                            f"{str(other.get('model_sha256'))[:12]}...); this one has model "
                            f"{model} (sha256 {model_sha256[:12]}...). Give each model its own "
                            "--reports folder, or stop the other daemon first"
                        )
                fcntl.flock(fd, fcntl.LOCK_SH)  # held while this daemon runs
        except BaseException:
            os.close(fd)
            raise
        self._writers_fd = fd

    def release(self) -> None:
        """Give up this daemon's share of the reports folder (at exit)."""
        fd, self._writers_fd = self._writers_fd, None
        if fd is not None:
            os.close(fd)

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
        header = csv_line(self.columns)
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

    def refresh_json(self, rel: str, record: dict[str, Any]) -> None:
        """Rewrite the JSON report of ``rel`` (its earlier content is back under its name)."""
        try:
            with self._locked():
                write_json_atomic(json_path(self.reports, rel), record)
        except OSError as exc:
            raise ReportWriteError(
                f"{json_path(self.reports, rel)}: cannot write the report ({exc.strerror or exc})"
            ) from exc

    def flush(
        self,
        ledger: Ledger,
        *,
        hold_seconds: float = 60.0,
        progress: Callable[[], None] | None = None,
    ) -> list[Finished]:
        """Write every finished-but-unreported ledger row; return the rows written.

        A row whose JSON report cannot be written while others can is *held*: set aside in
        the ledger with its reason, tried again after ``hold_seconds`` and at every start,
        so that it never blocks the rows after it. When nothing can be written (disk full,
        folder unwritable), raises :class:`ReportWriteError` and every row stays unreported,
        to be retried later. ``progress`` is called after each group of JSON files
        (``MAX_OPEN`` at most: a long flush is work, not a hang).
        """
        try:
            self.reports.mkdir(parents=True, exist_ok=True)  # recreated if someone removed it
            with self._locked():
                self._recover(ledger)
                rows = ledger.unreported()
                if not rows:
                    return []
                self._ensure_header()
                written: list[Finished] = []
                failed: list[tuple[Finished, str]] = []
                for start in range(0, len(rows), MAX_OPEN):
                    self._write_json(rows[start : start + MAX_OPEN], written, failed)
                    if progress is not None:
                        progress()
                if failed and not written:
                    self._check_json_writable()  # raises when no report can be written at all
                if failed:
                    for row, reason in failed:
                        logger.error(
                            "%s: report not written (%s); the other files go on, this one is "
                            "retried in %.0f s and at the next start",
                            row.path,
                            reason,
                            hold_seconds,
                        )
                    ledger.hold_report([(r.id, why) for r, why in failed], hold_seconds)
                if not written:
                    return []
                buf = io.StringIO()
                writer = csv.writer(buf, lineterminator="\n")
                for row in written:
                    writer.writerow(csv_row(row.record, self.classes))
                data = buf.getvalue().encode("utf-8", "backslashreplace")
                ids = [r.id for r in written]
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
                return written
        except OSError as exc:
            raise ReportWriteError(
                f"{self.reports}: cannot write reports ({exc.strerror or exc}); "
                "outcomes are kept in the ledger and will be written on the next try"
            ) from exc

    def _write_json(
        self,
        rows: list[Finished],
        written: list[Finished],
        failed: list[tuple[Finished, str]],
    ) -> None:
        """Write the JSON reports of ``rows`` with one wait for the disk (``replace_all``:
        every file, then every fsync, then every rename, then each folder's fsync); each row
        goes to ``written`` or, with the reason naming its file, to ``failed``."""
        staged: list[tuple[Finished, Path, bytes]] = []
        for row in rows:
            target = json_path(self.reports, row.path)
            try:
                make_dirs(target.parent)  # names a file in the way of the folder
                staged.append((row, target, _json_bytes(row.record)))
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else None
                failed.append((row, f"{target}: {reason or exc}"))
        errors = replace_all([(target, data) for _, target, data in staged])
        for (row, target, _), error in zip(staged, errors, strict=True):
            if error is None:
                written.append(row)
            else:
                failed.append((row, f"{target}: {error.strerror or error}"))

    def _check_json_writable(self) -> None:
        """Raise OSError when no JSON report can be written (rather than one bad row)."""
        folder = self.reports / "json"
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f".write-test-{os.getpid()}.json", {})
        os.unlink(folder / f".write-test-{os.getpid()}.json")


def read_csv(path: Path) -> list[dict[str, str]]:
    """Parse a predictions.csv (used by tests, ``status`` and the demo)."""
    with Path(path).open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))
