"""Helpers shared by the DICOM node tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import socket
import subprocess
from collections import defaultdict
from pathlib import Path

import pydicom

LOOPBACK = "127.0.0.1"
# storescu proposes uncompressed syntaxes unless told; a real modality is configured the
# same way. One option per compressed transfer syntax family.
_STORESCU_OPTION = {
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


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID)


def storescu_groups(files: list[Path]) -> list[tuple[str, list[Path]]]:
    """Files grouped by the storescu option that proposes their transfer syntax."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        ds = pydicom.dcmread(f, force=True, stop_before_pixels=True)
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        groups[_STORESCU_OPTION.get(ts, "-x=")].append(f)
    return sorted(groups.items())


def storescu(
    tools: dict[str, str],
    port: int,
    files: list[Path],
    aet: str = "MODALITY",
    aec: str = "XRWATCH",
) -> list[subprocess.CompletedProcess[str]]:
    """Send ``files`` like a modality (one association per transfer syntax family)."""
    out = []
    for option, group in storescu_groups(files):
        cmd = [tools["storescu"], option, "-aet", aet, "-aec", aec, LOOPBACK, str(port)]
        out.append(subprocess.run([*cmd, *map(str, group)], capture_output=True, text=True))
    return out


def echoscu(tools: dict[str, str], port: int, aet: str, aec: str = "XRWATCH") -> int:
    return subprocess.run(
        [tools["echoscu"], "-aet", aet, "-aec", aec, LOOPBACK, str(port)],
        capture_output=True, timeout=60,
    ).returncode  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])
