"""Text from inputs (file names, DICOM values) made safe to print on a terminal or a log."""

from __future__ import annotations

import re

# C0 and C1 control characters (ESC starts terminal escape sequences), DEL, and the lone
# surrogates that stand for bytes of a name that is not UTF-8.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with control characters and lone surrogates written as ``\\xNN``/``\\uNNNN``.

    >>> printable("CT\\x1b[2J")
    'CT\\\\x1b[2J'
    """
    return _UNSAFE.sub(_escape, text)
