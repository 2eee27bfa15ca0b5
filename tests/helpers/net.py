"""Loopback ports and DCMTK's storescu options, for the tests and the DICOM benchmark."""

from __future__ import annotations

import socket
from collections import defaultdict
from pathlib import Path

LOOPBACK = "127.0.0.1"

# storescu proposes uncompressed syntaxes unless told; a real modality is configured the
# same way. One option per compressed transfer syntax family.
STORESCU_OPTION = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def storescu_option(transfer_syntax: str) -> str:
    """The storescu option that proposes ``transfer_syntax`` (``-x=``: uncompressed)."""
    return STORESCU_OPTION.get(transfer_syntax, "-x=")


def storescu_groups(files: list[Path]) -> list[tuple[str, list[Path]]]:
    """Files grouped by the storescu option that proposes their transfer syntax."""
    import pydicom

    groups: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        ds = pydicom.dcmread(f, force=True, stop_before_pixels=True)
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        groups[storescu_option(ts)].append(f)
    return sorted(groups.items())
