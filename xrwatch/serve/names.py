"""How a file's path under INCOMING is written in the ledger, the reports and the logs.

A POSIX file name is bytes. A name that is not UTF-8 (Latin-1 ``M\\xfcller.png`` from an
old SMB client) reaches Python as surrogate escapes, which SQLite, CSV and JSON cannot
store; a line break or a terminal escape in a name would split a CSV row or a log line.
So every name is *escaped* once, where it is first named: an undecodable byte becomes
``\\xNN``, a control character ``\\n``, ``\\r``, ``\\t`` or ``\\xNN`` (``\\uNNNN`` above
0x7f), and a backslash ``\\\\``. Escaping is injective (the backslash itself is escaped),
so two different names never share a report row, and an ordinary UTF-8 name without
backslashes is written as it is.
"""

from __future__ import annotations

import os

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape_name(name: str) -> str:
    """``name`` (as ``os`` functions return it, surrogate escapes included) as plain text."""
    text = os.fsencode(name).decode("utf-8", errors="surrogateescape")
    if text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to escape
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif not ch.isprintable() and ch != " ":
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)
