"""Fixtures for the daemon tests; the harness itself is in ``serve_harness.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_harness import DaemonProc


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    incoming, reports = tmp_path / "incoming", tmp_path / "reports"
    incoming.mkdir()
    return incoming, reports


@pytest.fixture
def daemons(tiny_onnx_model: Path) -> Iterator[Callable[..., DaemonProc]]:
    """Factory for :class:`DaemonProc` bound to the tiny model; kills leftovers at the end."""
    made: list[DaemonProc] = []

    def factory(incoming: Path, reports: Path, *extra: str, **kw: Any) -> DaemonProc:
        d = DaemonProc(incoming, reports, tiny_onnx_model, *extra, **kw)
        made.append(d)
        return d

    yield factory
    for d in made:
        d.cleanup()
