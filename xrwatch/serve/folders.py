"""Folders: the daemon's INCOMING, REPORTS, state dir and archive, checked at start.

Owns the rules on where the daemon reads and writes: what it writes lies outside what it
watches (otherwise it would classify its own output); no folder is ``/``, and none of the
folders it writes (reports, state dir, archive) is INCOMING, REPORTS or a folder above
either (an archive at ``/`` would move inputs to ``/processed``, a state dir above REPORTS
would put the ledger among the reports' parents); and the archive can be written before
any file is moved there. :func:`check_folders` raises a :class:`ConfigError` or
:class:`ReportWriteError` naming the folder and the reason; the CLI exits 2 with that line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from xrwatch.errors import ConfigError, ReportWriteError
from xrwatch.serve.config import ServeConfig
from xrwatch.serve.intake import inside

logger = logging.getLogger(__name__)


def _refuse(cfg: ServeConfig, name: str, given: Path, incoming: Path, reports: Path | None) -> None:
    """Refuse the ``name`` folder ``given`` when it is ``/``, inside INCOMING, above it, or
    (``reports`` given) REPORTS itself or above it."""
    path = given.resolve()
    if path == Path(path.anchor):
        raise ConfigError(f"{given}: the {name} cannot be the root folder {path}")
    if inside(path, incoming):
        raise ConfigError(
            f"{given}: the {name} must be outside INCOMING ({cfg.incoming}); "
            "otherwise the daemon would watch its own output"
        )
    if inside(incoming, path):
        raise ConfigError(f"{given}: the {name} cannot be a folder above INCOMING ({cfg.incoming})")
    if reports is not None and inside(reports, path):
        what = "REPORTS itself" if path == reports else f"a folder above REPORTS ({cfg.reports})"
        raise ConfigError(f"{given}: the {name} cannot be {what}")


def check_folders(cfg: ServeConfig) -> Path:
    """Check the folders of ``cfg``; return INCOMING resolved (the root every name in the
    ledger, the reports and the archive is relative to)."""
    incoming = cfg.incoming.resolve()
    if not incoming.is_dir():
        raise ConfigError(f"{cfg.incoming}: INCOMING folder does not exist or is not a folder")
    if incoming == Path(incoming.anchor):
        raise ConfigError(f"{cfg.incoming}: INCOMING cannot be the root folder {incoming}")
    _refuse(cfg, "reports", cfg.reports, incoming, None)
    reports = cfg.reports.resolve()
    for name, given in (("state dir", cfg.state_path), ("archive", cfg.archive)):
        if given is not None:
            _refuse(cfg, name, given, incoming, reports)
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
