"""The folder daemon: ``xrwatch serve INCOMING`` classifies every file dropped into a folder,
exactly once, across crashes and restarts.

Modules, in the order a file meets them:

- :mod:`.watcher`    watchdog events, backlog scan and periodic rescan -> candidate paths
- :mod:`.stability`  waits until a candidate is complete (closed, or size+mtime stable)
- :mod:`.intake`     a worker reads it safely out of INCOMING, hashes, claims, decodes
  (:mod:`.decoders`: in the thread, or in a worker process of its own)
- :mod:`.ledger`     SQLite (WAL) source of truth: atomic claims, outcomes, report flags
- :mod:`.pipeline`   batches -> inference engine -> begun-batch queue -> ledger
- :mod:`.outcomes`   a result's report record, flag and heatmap job
- :mod:`.delivery`   reports written from the ledger (:mod:`.reports`: CSV + per-file
  JSON), then the optional move to ``processed/`` or ``failed/`` (:mod:`.archive`)
- :mod:`.liveness`   heartbeat thread, ``/healthz`` and the status line
  (:mod:`.metrics`, :mod:`.sdnotify`: Prometheus + /healthz, systemd notify protocol)
- :mod:`.daemon`     the lifecycle: checks the folders (:mod:`.folders`), builds the
  rooms above, runs the loop between them, handles signals and shuts down

This package never imports torch.
"""

from __future__ import annotations
