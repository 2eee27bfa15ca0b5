"""Logging set-up for the CLI (library modules only ever call ``logging.getLogger``).

Two formats: ``text`` (one human-readable line per event) and ``json`` (one JSON object
per line, for journald/ELK). Under systemd (stderr is the stream named by
``JOURNAL_STREAM``) every line starts with its syslog priority, ``<3>`` for an error, as
sd-daemon(3) describes, so that ``journalctl -p err`` finds errors; journald strips the
prefix. What native libraries (ONNX Runtime) write to stderr while a model loads is caught
by :func:`native_stderr_to_log` and logged in the same format.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Literal

from xrwatch.errors import ConfigError
from xrwatch.safetext import printable

LogFormat = Literal["text", "json"]
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_STD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

# syslog priorities of the logging levels (sd-daemon(3) prefixes)
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    return next((prio for level, prio in _PRIORITIES if levelno >= level), 7)


def stderr_is_journal() -> bool:
    """Whether stderr is connected to journald: ``JOURNAL_STREAM`` ("device:inode", set by
    systemd) names the file stderr is open on."""
    try:
        device, inode = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                payload[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info).replace("\n", " | ")
        return json.dumps(payload, ensure_ascii=False)


class OneLineFormatter(logging.Formatter):
    """Text format that keeps every event (tracebacks included) on one line, with control
    characters (a terminal escape in a class name or a DICOM value) written as ``\\xNN``."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record).replace("\n", " | "))


class JournalFormatter(logging.Formatter):
    """Another formatter's line, prefixed with its syslog priority (``<3>...``) for journald."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{self.inner.format(record)}"


def configure_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Configure the root logger once, to stderr. Only the CLI calls this.

    Raises :class:`ConfigError` for an unknown level or format (a usage error, exit 2).
    """
    if level.upper() not in LEVELS:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in ("text", "json"):
        raise ConfigError(f"log format {fmt!r} is not one of text, json")
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        formatter = OneLineFormatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
        )
    handler.setFormatter(JournalFormatter(formatter) if stderr_is_journal() else formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings too: in the chosen format, not raw text
    for noisy in ("PIL", "watchdog", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # pydicom's loggers are not set here: xrwatch.imageio.dicom routes them (it needs their
    # warnings to detect truncation, and logs them at DEBUG with the file's name).


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# ONNX Runtime's own lines: "<time> [W:onnxruntime:<logid>, file.cc:123 Function] message"
_ORT_LINE = re.compile(r"\[([VIWEF]):onnxruntime:[^\]]*\]\s*(.*)")
_ORT_LEVELS = {"V": logging.DEBUG, "I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR}


@contextlib.contextmanager
def native_stderr_to_log(name: str = "onnxruntime") -> Iterator[None]:
    """Log, through logger ``name``, what native code writes to file descriptor 2 meanwhile.

    ONNX Runtime's C++ logger writes ANSI-coloured text straight to stderr (a provider that
    fails to load, a removed initializer ...), past Python's logging: with
    ``--log-format json`` that would break every JSON consumer. Each captured line becomes
    one record, at ONNX Runtime's own severity, without colour codes.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield  # no file descriptor 2 to redirect
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            _log_native_lines(logging.getLogger(name), captured.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def printed_to_log(name: str = "onnxruntime") -> Iterator[None]:
    """Log, through logger ``name``, what Python code prints meanwhile (onnxruntime's
    ``preload_dlls`` prints coloured warnings to stdout, which journald would also get)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        _log_native_lines(logging.getLogger(name), buffer.getvalue())


def _log_native_lines(log: logging.Logger, text: str) -> None:
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).strip()
        if not line:
            continue
        match = _ORT_LINE.search(line)
        if match:
            log.log(_ORT_LEVELS.get(match.group(1), logging.CRITICAL), "%s", match.group(2))
        else:
            log.warning("%s", line)
