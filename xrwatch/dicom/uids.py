"""The UIDs of what xrwatch creates, and the checks of the UIDs it reads.

Every UID xrwatch makes starts with :data:`UID_ROOT`: ``2.25.`` followed by the integer of
one fixed name-based UUID (ISO/IEC 9834-8, the way to own an OID arc without registering
one). So an object xrwatch made can be told apart by its UIDs (see
:func:`is_xrwatch_uid`; ``xrwatch.dicom.provenance`` also checks Manufacturer and Image
Type). Under the root, one arc says what the UID names (:class:`Kind`) and the last arc is
a hash of what it is derived from: the same inputs always give the same UID, so building a
result again after a crash, or sending it again, never makes a second object in a PACS.

UIDs read from a source (a file dropped into INCOMING carries whatever it carries) are
checked with :func:`is_valid_uid` before they name anything; :func:`path_part` turns one
into a safe file name either way.
"""

from __future__ import annotations

import enum
import hashlib
import re
import uuid

# 2.25.<the integer of uuid5(NAMESPACE_URL, "xrwatch:dicom-uid-root")>: 44 characters.
UID_ROOT = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'xrwatch:dicom-uid-root').int}"
MAX_UID_LENGTH = 64  # PS3.5 9.1
_VALID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")  # PS3.5 9.1: no leading zeros


class Kind(enum.IntEnum):
    """The arc under :data:`UID_ROOT` that says what a UID names."""

    SR_SERIES = 1
    SR_INSTANCE = 2
    SC_SERIES = 3
    SC_INSTANCE = 4
    DEVICE = 5  # the device observer (this xrwatch, as a device in the SR)
    TRACKING = 6  # tracking identifiers of the SR's measurement groups


def derived_uid(kind: Kind, *parts: str) -> str:
    """``UID_ROOT.<kind>.<hash of parts>``, as long as a UID may be: the same ``parts`` give
    the same UID, different ones a different UID (a 56-bit hash or more)."""
    prefix = f"{UID_ROOT}.{int(kind)}."
    digits = MAX_UID_LENGTH - len(prefix)
    digest = hashlib.sha256(chr(31).join(parts).encode("utf-8")).digest()
    number = int.from_bytes(digest, "big") % 10**digits
    return prefix + str(number)  # str(int) has no leading zero, as a UID component must


def is_xrwatch_uid(uid: object) -> bool:
    """Whether ``uid`` was made by xrwatch (starts with :data:`UID_ROOT` and a dot)."""
    return str(uid or "").strip().startswith(UID_ROOT + ".")


def is_valid_uid(uid: object) -> bool:
    """Whether ``uid`` is a syntactically valid DICOM UID (digits and dots, at most 64
    characters, no empty or zero-led component): never a path, a name or a traversal."""
    text = str(uid or "")
    return len(text) <= MAX_UID_LENGTH and _VALID.match(text) is not None


def path_part(uid: object) -> str:
    """A file-name part for ``uid``: the UID itself when valid, else ``x`` and the sha256
    of its text (so what a dropped file carries never becomes a path component)."""
    text = str(uid or "")
    if is_valid_uid(text):
        return text
    return "x" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:40]
