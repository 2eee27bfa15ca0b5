"""The ``xrwatch`` command line. Each command lives in its own module under this package;
commands that need torch (``train``, ``export``...) import it lazily, inside the command."""

from __future__ import annotations

from xrwatch.cli._app import app, main

__all__ = ["app", "main"]
