"""Overlays: results whose heatmap could not be written, held and retried.

Owns what happens when a batch's heatmap overlay cannot be written (the disk is full, a
folder is in the way of ``REPORTS/heatmaps/<relative path>.png``): instead of recording
the result without its picture for good, the result is held back (its file stays claimed;
nothing of it is in the ledger, the reports or the DICOM outbox yet) and its overlay is
written again with back-off, as failed reports are. Once written, the result is recorded
with it, so the DICOM SR that follows carries its overlay. After ``GIVE_UP_SECONDS`` of
failures (with ``--once``, ``ONCE_TRIES`` tries), or at once when no retry can help (a
name too long for the file system), it is recorded without it, knowingly: ``heatmap`` is
null and ``heatmap_error`` says why. Each held result is logged when it is held, when it
is written and when it is given up, not at every try. At shutdown the ones still held
stay claimed and unrecorded; the next start reads their files again.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xrwatch.serve.intake import Work

if TYPE_CHECKING:
    from xrwatch.heatmap import HeatmapJob

logger = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 1.0  # the first retry; each later one waits twice as long ...
RETRY_MAX_SECONDS = 60.0  # ... up to this
GIVE_UP_SECONDS = 600.0  # failing this long: recorded without its heatmap
ONCE_TRIES = 3  # with --once, recorded without its heatmap after this many failed tries

Outcome = tuple[int, str, dict[str, Any]]  # (ledger row, state, record)


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing
    parent) allows; 255 when it cannot be asked."""
    for candidate in (folder, *folder.parents):
        try:
            return int(os.pathconf(candidate, "PC_NAME_MAX"))
        except (OSError, ValueError):
            continue
    return 255


@dataclass
class _Held:
    work: Work
    outcome: Outcome
    job: HeatmapJob
    since: float  # monotonic time of the first failure
    error: str
    tries: int = 1
    due: float = 0.0


class Overlays:
    """The held results of one daemon; used by the main loop's thread only."""

    def __init__(self, reports: Path, *, once: bool) -> None:
        self.reports = reports
        self.once = once
        self._held: list[_Held] = []

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, work: Work, outcome: Outcome, job: HeatmapJob, error: str) -> bool:
        """``outcome``'s heatmap ``job`` failed with ``error``: hold it for a retry. When no
        retry can help (its file name is longer than the file system allows), say so and
        return False: ``outcome`` is then to be recorded now, without its heatmap."""
        from xrwatch.heatmap import heatmap_path

        now = time.monotonic()
        held = _Held(work, outcome, job, now, error, due=now + self._wait(1))
        name = heatmap_path(job.root, job.rel).name
        if len(os.fsencode(name)) > _name_max(self.reports):
            held.error = f"its file name {name!r} is longer than the file system allows"
            self._without(held)
            return False
        self._held.append(held)
        logger.warning(
            "%s: result held back until its heatmap can be written (%s); retrying for up to %s",
            work.rel,
            error,
            f"{ONCE_TRIES} tries" if self.once else f"{GIVE_UP_SECONDS:.0f} s",
        )
        return True

    def due(self, now: float) -> bool:
        return any(h.due <= now for h in self._held)

    def retry(self, now: float, *, last: bool = False) -> list[tuple[Work, Outcome]]:
        """Write the overlays that are due (all with ``last``); return the results to
        record now: those written, and those given up (recorded without, knowingly)."""
        from xrwatch.atomic import write_atomic
        from xrwatch.heatmap import PNG_TMP_SUFFIX, encode_overlay, heatmap_path

        ready: list[tuple[Work, Outcome]] = []
        keep: list[_Held] = []
        for held in self._held:
            if held.due > now and not last:
                keep.append(held)
                continue
            path = heatmap_path(held.job.root, held.job.rel)
            try:
                write_atomic(path, encode_overlay(held.job), suffix=PNG_TMP_SUFFIX)
            except OSError as exc:
                held.tries += 1
                held.error = f"{path}: {exc.strerror or exc}"
                if self._given_up(held, now):
                    ready.append((held.work, self._without(held)))
                else:
                    held.due = now + self._wait(held.tries)
                    keep.append(held)
                continue
            record = held.outcome[2]
            record["heatmap"] = path.relative_to(self.reports).as_posix()
            logger.info("%s: heatmap written on try %d", held.work.rel, held.tries + 1)
            ready.append((held.work, held.outcome))
        self._held = keep
        return ready

    def give_up(self) -> list[tuple[Work, Outcome]]:
        """Every held result, without its heatmap (``--once``: nothing is left for later)."""
        ready = [(held.work, self._without(held)) for held in self._held]
        self._held = []
        return ready

    def _given_up(self, held: _Held, now: float) -> bool:
        if self.once:
            return held.tries >= ONCE_TRIES
        return now - held.since >= GIVE_UP_SECONDS

    def _without(self, held: _Held) -> Outcome:
        record = held.outcome[2]
        record["heatmap"] = None
        record["heatmap_error"] = held.error
        logger.error(
            "%s: recorded without its heatmap after %d tries: %s",
            held.work.rel,
            held.tries,
            held.error,
        )
        return held.outcome

    def _wait(self, tries: int) -> float:
        first = FIRST_RETRY_SECONDS / 4 if self.once else FIRST_RETRY_SECONDS
        return min(first * 2 ** (tries - 1), RETRY_MAX_SECONDS)
