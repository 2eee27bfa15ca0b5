"""Importing this module registers every command on :data:`xrwatch.cli._app.app`.

One import line per command module; each module must import without torch.
"""

from __future__ import annotations
from xrwatch.cli import serve_cmd  # noqa: F401
from xrwatch.cli import classify_cmd, export_cmd  # noqa: F401
from xrwatch.cli import train_cmd  # noqa: F401
from xrwatch.cli import doctor_cmd, inspect_cmd  # noqa: F401
