"""pydicom's (and its pixel plugins') log records and warnings, routed to xrwatch's log.

pydicom reports what it meets through its logger (and repeats it as a Python warning,
without the file's name). Its loggers are filtered here: while a file is read
(:func:`capture_library_logs`) their records are collected for that file, so that
:mod:`.dicom` can check them (an early end of file means truncation), and then logged at
DEBUG with the file's name, never with a plugin's traceback; outside a read they are logged
at DEBUG at once. The duplicate Python warnings are ignored process-wide
(``warnings.catch_warnings`` is not thread-safe, and the daemon reads in several threads).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

logger = logging.getLogger(__name__)

_LIBRARY_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg")
_CAPTURED: ContextVar[list[str] | None] = ContextVar("xrwatch_dicom_captured", default=None)


class _LibraryLogFilter(logging.Filter):
    """Takes pydicom's (and its plugins') records out of the log; keeps their one-line text.

    While a file is read the text is collected for that file (see
    :func:`capture_library_logs`); otherwise it is logged here at DEBUG.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = " ".join(record.getMessage().split())  # one line, no traceback
        except Exception:  # a malformed record must not break a read
            message = str(record.msg)
        captured = _CAPTURED.get()
        if captured is not None:
            captured.append(message)
        else:  # pydicom used outside read_dicom (tests, training tools)
            logger.debug("%s: %s", record.name, message)
        return False


_FILTER = _LibraryLogFilter()
_LOGGERS_SEEN = -1  # size of logging's logger registry when the filter was last placed


def _route_library_logs() -> None:
    """Put the filter on pydicom's loggers and their children (a filter on a logger does not
    see its children's records). Repeated at each read: plugins create loggers when first
    imported."""
    global _LOGGERS_SEEN
    manager = logging.getLogger().manager
    if len(manager.loggerDict) == _LOGGERS_SEEN:
        return  # no logger created since the last look
    _LOGGERS_SEEN = len(manager.loggerDict)
    names = [n for n in list(manager.loggerDict) if n.split(".")[0] in _LIBRARY_LOGGERS]
    for name in {*names, *_LIBRARY_LOGGERS}:
        lib = logging.getLogger(name)
        if _FILTER not in lib.filters:
            lib.addFilter(_FILTER)
        if name in _LIBRARY_LOGGERS and lib.level != logging.WARNING:
            lib.setLevel(logging.WARNING)  # warnings tell truncation; debug chatter is costly


_WARNING_MODULES = "(" + "|".join(_LIBRARY_LOGGERS) + r")(\.|$)"


def _ignore_library_warnings() -> None:
    """pydicom repeats each logged message as a Python warning: ignore those, process-wide.

    Checked at every read, not only at import, because a test runner (or an application)
    may restore the warning filters in between.
    """
    for f in warnings.filters:
        if f[0] == "ignore" and f[3] is not None and f[3].pattern == _WARNING_MODULES:
            return
    warnings.filterwarnings("ignore", module=_WARNING_MODULES)


_route_library_logs()


@contextmanager
def capture_library_logs(path: Path) -> Iterator[list[str]]:
    """Collect pydicom's log messages while reading ``path``; log them at DEBUG after."""
    _ignore_library_warnings()
    _route_library_logs()
    captured: list[str] = []
    token = _CAPTURED.set(captured)
    try:
        yield captured
    finally:
        _CAPTURED.reset(token)
        for message in captured:
            logger.debug("%s: pydicom: %s", path, message)
