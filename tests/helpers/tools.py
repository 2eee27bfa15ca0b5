"""External programs the tests check against (DCMTK, Orthanc, systemd-analyze)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED_XRAY = ROOT.parent / "shared" / "data" / "xray"


def require_tool(name: str, package: str) -> str:
    """The path of ``name``; skip (fail under XRWATCH_REQUIRE_SHARED_DATA=1) when absent.

    CI (``.ci/run``) installs every such Debian package, so there a missing tool is a failure,
    never a silent skip.
    """
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path:
        return path
    _skip_unless_required(
        f"{name} not found: install the Debian package {package} (apt-get install -y {package})"
    )


def require_shared_data(path: Path = SHARED_XRAY) -> Path:
    """Return ``path`` (default ../shared/data/xray, or a file or folder in ../shared); skip when
    absent, fail when XRWATCH_REQUIRE_SHARED_DATA=1."""
    if path.exists():
        return path
    _skip_unless_required(f"shared test data not found at {path} (see README: Test data)")


def _skip_unless_required(reason: str) -> NoReturn:
    """Skip with ``reason``; fail instead under XRWATCH_REQUIRE_SHARED_DATA=1 (as in CI)."""
    if os.environ.get("XRWATCH_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(f"{reason} (required: XRWATCH_REQUIRE_SHARED_DATA=1)")
    pytest.skip(reason)
