"""The name of the temporary files DICOM writes (:func:`xrwatch.atomic.write_atomic` with
``suffix=PART_SUFFIX``, and the receiver's :class:`xrwatch.dicom.spool.PartFile`); a
killed daemon's are swept at start by :meth:`xrwatch.dicom.spool.Spool.remove_stale_parts`,
which never follows a link out of the spool."""

from __future__ import annotations

PART_SUFFIX = ".part"  # temporary files are ".<random>.part": hidden, so no watcher takes them
