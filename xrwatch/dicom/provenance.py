"""Whether a DICOM object was made by xrwatch: never classify our own output.

A PACS that routes whole studies sends back what xrwatch sent it (its SR, its heatmap
Secondary Capture). Classifying those would feed on our own output: a result for the
overlay, sent again, routed again. Both intakes call :func:`own_output` on an object's
header: the receiver (acknowledges and skips it) and the folder intake.

The marks xrwatch puts on every object it makes (``xrwatch.dicom.sr``, ``.sc``):

- Manufacturer ``xrwatch`` and a SOP Instance UID under xrwatch's UID root
  (:data:`xrwatch.dicom.uids.UID_ROOT`), together: either alone could be a coincidence
  (another device named so; a UID copied into a foreign object);
- or Software Versions, or Content Creator's Name, starting with ``xrwatch``.
"""

from __future__ import annotations

from typing import Any

from xrwatch.dicom.uids import is_xrwatch_uid

MARK = "xrwatch"

# What :func:`own_output` reads: pass these to ``dcmread(specific_tags=...)``.
TAGS = ("Manufacturer", "SOPInstanceUID", "SoftwareVersions", "ContentCreatorName")


def _values(ds: Any, keyword: str) -> list[str]:
    value = ds.get(keyword) if hasattr(ds, "get") else None
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def own_output(ds: Any) -> str | None:
    """Why ``ds`` (a pydicom Dataset, or any mapping-like header) looks made by xrwatch;
    ``None`` when it does not."""
    manufacturer = [v.strip() for v in _values(ds, "Manufacturer")]
    if MARK in manufacturer and is_xrwatch_uid(ds.get("SOPInstanceUID")):
        return "Manufacturer xrwatch and a SOP Instance UID under xrwatch's UID root"
    for keyword in ("SoftwareVersions", "ContentCreatorName"):
        if any(v.strip().lower().startswith(MARK) for v in _values(ds, keyword)):
            return f"{keyword} starts with {MARK!r}"
    return None
