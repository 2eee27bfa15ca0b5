"""External programs the tests check against (DCMTK, Orthanc, systemd-analyze)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str, package: str) -> str:
    """The path of ``name``; skip (fail under XRWATCH_REQUIRE_SHARED_DATA=1) when absent.

    CI (``.ci/run``) installs every such Debian package, so there a missing tool is a failure,
    never a silent skip.
    """
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path:
        return path
    reason = (
        f"{name} not found: install the Debian package {package} (apt-get install -y {package})"
    )
    if os.environ.get("XRWATCH_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(reason + " (required: XRWATCH_REQUIRE_SHARED_DATA=1)")
    pytest.skip(reason)
