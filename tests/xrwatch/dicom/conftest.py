"""Fixtures for the DICOM node tests: real DICOM software on loopback ports.

DCMTK (``storescu``, ``echoscu``) plays the modality; Orthanc, started here with a
temporary configuration and storage folder, plays the PACS. When a tool is missing the
tests skip, or fail under ``XRWATCH_REQUIRE_SHARED_DATA=1`` (as CI runs them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))  # serve_harness
sys.path.insert(0, str(Path(__file__).resolve().parent))  # dicom_tools

from dicom_tools import LOOPBACK, free_port
from serve_harness import daemons, folders  # noqa: F401  (fixtures, registered by import)

from tests.helpers.tools import require_tool


@pytest.fixture(scope="session")
def dcmtk() -> dict[str, str]:
    return {
        "storescu": require_tool("storescu", "dcmtk"),
        "echoscu": require_tool("echoscu", "dcmtk"),
        "dsrdump": require_tool("dsrdump", "dcmtk"),
    }


class Orthanc:
    """A real Orthanc on loopback ports, with its own storage (the test's PACS)."""

    def __init__(self, binary: str, root: Path, dicom_port: int | None = None) -> None:
        self.http_port, self.dicom_port = free_port(), dicom_port or free_port()
        self.root = root
        config = {
            "Name": "xrwatch-test",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
            "HttpThreadsCount": 4,
            "ConcurrentJobs": 1,
        }
        root.mkdir(parents=True, exist_ok=True)
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = (root / "orthanc.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, str(root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.get("/system")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "Orthanc did not start:\n" + (root / "orthanc.log").read_text()
                    ) from None
                time.sleep(0.2)

    @property
    def destination(self) -> str:
        return f"ORTHANC@{LOOPBACK}:{self.dicom_port}"

    def get(self, path: str) -> Any:
        url = f"http://{LOOPBACK}:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())

    def instances_tags(self) -> list[dict[str, Any]]:
        """Every stored instance: its simplified tags plus its Orthanc study id."""
        out = []
        for iid in self.get("/instances"):
            tags = self.get(f"/instances/{iid}/simplified-tags")
            tags["_study"] = self.get(f"/instances/{iid}/study")["ID"]
            out.append(tags)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """Start Orthanc servers (``dicom_port=`` to choose its DICOM port); stopped at the end."""
    binary = require_tool("Orthanc", "orthanc")
    made: list[Orthanc] = []

    def factory(dicom_port: int | None = None) -> Orthanc:
        server = Orthanc(binary, tmp_path / f"orthanc{len(made)}", dicom_port)
        made.append(server)
        return server

    yield factory
    for server in made:
        server.stop()


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., Orthanc]) -> Orthanc:
    return orthanc_factory()
