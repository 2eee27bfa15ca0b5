"""Importing this module registers every command on :data:`xrwatch.cli._app.app`.

One import line per command module; each module must import without torch.
"""

from __future__ import annotations
