"""Logging set-up for the CLI (library modules only ever call ``logging.getLogger``).

Two formats: ``text`` (one human-readable line per event) and ``json`` (one JSON object
per line, for journald/ELK).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

from xrwatch.errors import ConfigError

LogFormat = Literal["text", "json"]
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_STD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


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
    """Text format that keeps every event (tracebacks included) on one line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


def configure_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Configure the root logger once, to stderr. Only the CLI calls this.

    Raises :class:`ConfigError` for an unknown level or format (a usage error, exit 2).
    """
    if level.upper() not in LEVELS:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in ("text", "json"):
        raise ConfigError(f"log format {fmt!r} is not one of text, json")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("PIL", "watchdog", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # The DICOM reader turns what pydicom warns about into its own errors naming the file;
    # pydicom's warnings (without a file name) would only repeat them.
    logging.getLogger("pydicom").setLevel(max(logging.ERROR, root.level))
