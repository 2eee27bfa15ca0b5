"""The DICOM node of ``xrwatch serve``: receive images over the network, send results back.

It feeds and drains the folder daemon through its ledger and never classifies anything
itself; the daemon's loop stays the one place that claims, infers and records.

- :mod:`.scp`       C-STORE/C-ECHO receiver -> durable files in ``INCOMING/dicom/<UIDs>``;
  with :mod:`.gate` (what a peer may hold; its associations wait, not poll:
  :mod:`.reactor_waits`), :mod:`.spool` (no links followed),
  :mod:`.header` (complete or truncated), :mod:`.receipts` (one content per SOP UID),
  :mod:`.provenance` (xrwatch's own output, also for the folder), :mod:`.pynetdicom_glue`
- :mod:`.outbox`    the ledger's DICOM tables: received UIDs, pending results, sends (parked)
- :mod:`.sr`, :mod:`.sc`   a result as a TID 1500 SR (codes: :mod:`.codes`); its heatmap as
  a Secondary Capture; their UIDs under xrwatch's root (:mod:`.uids`)
- :mod:`.writer`    builds each due SR/SC into ``REPORTS/dicom`` (paths from valid UIDs)
- :mod:`.sender`    a writer thread and one sender thread per destination (C-STORE, per item)
- :mod:`.node`      wires these into a :class:`xrwatch.serve.daemon.Daemon` (``attach``)
- :mod:`.settings`  checks of the DICOM options, ``AE@host:port``

This package never imports torch.
"""
