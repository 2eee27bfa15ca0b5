"""Helpers shared by the DICOM node tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom

from tests.helpers.net import LOOPBACK, free_port, storescu_groups

__all__ = ["LOOPBACK", "echoscu", "free_port", "sop_uid", "storescu", "storescu_groups"]


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID)


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
