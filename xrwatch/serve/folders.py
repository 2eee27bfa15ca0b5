"""Folders: the daemon's INCOMING, REPORTS, state dir and archive, checked at start.

Owns the rule that what the daemon writes lies outside what it watches (otherwise it would
classify its own output) and that the archive can be written before any file is moved
there. :func:`check_folders` raises a :class:`ConfigError` or :class:`ReportWriteError`
naming the folder and the reason; the CLI turns them into exit status 2.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from xrwatch.errors import ConfigError, ReportWriteError
from xrwatch.serve.config import ServeConfig
from xrwatch.serve.intake import inside

logger = logging.getLogger(__name__)


def check_folders(cfg: ServeConfig) -> Path:
    """Check the folders of ``cfg``; return INCOMING resolved (the root every name in the
    ledger, the reports and the archive is relative to)."""
    incoming = cfg.incoming.resolve()
    if not incoming.is_dir():
        raise ConfigError(f"{cfg.incoming}: INCOMING folder does not exist or is not a folder")
    for name, path in (
        ("reports", cfg.reports),
        ("state dir", cfg.state_path),
        ("archive", cfg.archive),
    ):
        if path is not None and inside(path.resolve(), incoming):
            raise ConfigError(
                f"{path}: the {name} must be outside INCOMING ({cfg.incoming}); "
                "otherwise the daemon would watch its own output"
            )
    if cfg.archive is not None:
        try:
            cfg.archive.mkdir(parents=True, exist_ok=True)
            probe = cfg.archive / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ReportWriteError(
                f"{cfg.archive}: archive folder is not writable ({exc.strerror or exc})"
            ) from exc
    return incoming
