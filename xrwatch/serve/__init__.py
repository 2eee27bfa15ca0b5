"""The folder daemon: ``xrwatch serve INCOMING`` classifies every file dropped into a folder,
exactly once, across crashes and restarts.

Modules, in the order a file meets them:

- :mod:`.watcher`    watchdog events, backlog scan and periodic rescan -> candidate paths
- :mod:`.stability`  waits until a candidate is complete (closed, or size+mtime stable)
- :mod:`.ledger`     SQLite (WAL) source of truth: atomic claims, outcomes, report flags
- :mod:`.daemon`     worker pool (hash, claim, decode) -> batches -> inference engine
- :mod:`.reports`    CSV + per-file JSON, reconciled from the ledger at start
- :mod:`.archive`    optional move to ``processed/`` or ``failed/``
- :mod:`.metrics`, :mod:`.sdnotify`   Prometheus + /healthz, systemd notify protocol

This package never imports torch.
"""

from __future__ import annotations
