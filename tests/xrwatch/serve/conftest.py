"""Fixtures for the daemon tests; the harness and its fixtures are in ``serve_harness.py``."""

from __future__ import annotations

from serve_harness import daemons, folders

__all__ = ["daemons", "folders"]  # fixtures, registered by being imported here
