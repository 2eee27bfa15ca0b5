"""Pipeline: batches, inference and the begun-batch queue, up to the ledger.

Owns the way from decoded inputs to recorded outcomes. Inputs (and files that failed to
read) gather in a batch until it holds ``batch_size`` inputs or is ``max_wait`` old; the
batch is then inferred and its outcomes built (:meth:`Pipeline._begin`), and its heatmaps
are written in the background (:meth:`HeatmapWriter.submit_many`) while the loop infers the
next batch. :meth:`Pipeline._finish` waits for a batch's heatmaps, then records it in the
ledger (the finish hooks run in that transaction), then hands it to the delivery (reports,
archive). Begun batches wait oldest first (at most two): one that cannot be finished stays
first, so none after it is recorded before it, and no ledger row names a heatmap that is
not on disk. An inference or ledger write that fails is retried with back-off (the files
stay claimed); while an inference is retried, the batch begun before it is recorded.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xrwatch.errors import ModelError, XRWatchError
from xrwatch.serve.config import ServeConfig
from xrwatch.serve.delivery import Delivery
from xrwatch.serve.intake import Work
from xrwatch.serve.ledger import FinishHook, Ledger, LedgerError
from xrwatch.serve.liveness import RETRY_MAX_SECONDS, Liveness, Standing
from xrwatch.serve.metrics import Metrics
from xrwatch.serve.outcomes import Engine, Outcomes
from xrwatch.serve.overlays import Overlays

if TYPE_CHECKING:
    from xrwatch.heatmap import HeatmapJob, HeatmapWriter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Probabilities:
    """Outputs of an engine that has only ``predict_arrays`` (no cam, no guard)."""

    probabilities: np.ndarray


@dataclass
class _Begun:
    """A batch inferred, with its outcomes, whose heatmaps are being written."""

    batch: list[Work]
    outcomes: list[tuple[int, str, dict[str, Any]]]
    heatmaps: list[tuple[dict[str, Any], HeatmapJob]]
    written: cf.Future[list[Path | None]] | None  # the heatmaps' paths, once written

    def ready(self) -> bool:
        return self.written is None or self.written.done()


class Pipeline:
    """The batches of one daemon, from the first input to the ledger; used by the main
    loop's thread only (the heatmap writer's threads call back through ``wake``)."""

    def __init__(
        self,
        config: ServeConfig,
        engine: Engine,
        outcomes: Outcomes,
        ledger: Ledger,
        delivery: Delivery,
        *,
        finish_hooks: list[FinishHook],
        standing: Standing,
        metrics: Metrics,
        liveness: Liveness,
        stop: threading.Event,
        wake: threading.Event,
    ) -> None:
        self.config = config
        self.engine = engine
        self.outcomes = outcomes
        self.ledger = ledger
        self.delivery = delivery
        self.finish_hooks = finish_hooks  # the daemon's list: extensions append to it
        self.standing = standing
        self.metrics = metrics
        self.liveness = liveness
        self._stop = stop
        self._wake = wake
        self.overlays = Overlays(config.reports, once=config.once)  # results held for them
        self.batch: list[Work] = []
        self.batch_started: float | None = None
        # inferred, heatmaps being written, not yet recorded; oldest first, at most two
        self.begun: list[_Begun] = []
        # a batch's heatmaps are written in parallel; its threads start with the first batch
        self._heatmaps: HeatmapWriter | None = None
        if outcomes.heatmaps:
            from xrwatch.heatmap import HeatmapWriter

            self._heatmaps = HeatmapWriter()

    def __len__(self) -> int:
        """Files in the batch being gathered."""
        return len(self.batch)

    def idle(self) -> bool:
        """No batch gathered, none begun, no result held for its heatmap."""
        return not self.batch and not self.begun and not len(self.overlays)

    def add(self, work: Work) -> None:
        """An input, or a file that failed to read, for the next batch."""
        self.batch.append(work)
        if self.batch_started is None:
            self.batch_started = time.monotonic()

    def due(self, now: float) -> bool:
        """Whether the batch is full or has waited ``max_wait``."""
        cfg = self.config
        return bool(self.batch) and (
            len([w for w in self.batch if w.kind == "input"]) >= cfg.batch_size
            or now - (self.batch_started or now) >= cfg.max_wait
        )

    def begin_due(self) -> None:
        """Infer the gathered batch while the batch before's heatmaps are written; then
        record that one (its heatmaps have had this inference's time)."""
        batch, self.batch, self.batch_started = self.batch, [], None
        self.begun.append(self._begin(batch))
        self.finish_begun(keep=1)

    def finish_ready(self) -> None:
        """Record the oldest begun batch if its heatmaps are written."""
        if self.begun and self.begun[0].ready():
            self.finish_begun()

    def close(self) -> None:
        if self._heatmaps is not None:
            self._heatmaps.close()

    def _infer(self, inputs: list[Work]) -> Any:
        """Run the engine; on failure log and retry with back-off (the files stay claimed).

        Returns the engine's ``BatchOutputs`` (probabilities, cam, guard scores), or for an
        engine without ``predict_outputs`` an object with just ``probabilities``.
        """
        backoff = 1.0
        predict = getattr(self.engine, "predict_outputs", None)
        while True:
            try:
                t0 = time.perf_counter()
                arrays = np.stack([w.array for w in inputs if w.array is not None])
                if predict is not None:
                    out = predict(arrays)
                else:
                    out = _Probabilities(self.engine.predict_arrays(arrays))
                self.metrics.batch_seconds.observe(time.perf_counter() - t0)
                return out
            except (ModelError, MemoryError, RuntimeError) as exc:
                if self._stop.is_set() and backoff > RETRY_MAX_SECONDS:
                    raise
                logger.error("inference failed (%s); retrying in %.0f s", exc, backoff)
                self.finish_begun()  # what was inferred before is recorded meanwhile
                self.liveness.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS * 2)

    def _begin(self, batch: list[Work]) -> _Begun:
        """Infer a batch and build its outcomes; its heatmaps start being written in the
        background (:meth:`HeatmapWriter.submit_many`), so the loop can infer the next
        batch meanwhile. Nothing is recorded until :meth:`_finish`."""
        inputs = [w for w in batch if w.kind == "input"]
        outcomes: list[tuple[int, str, dict[str, Any]]] = []
        heatmaps: list[tuple[dict[str, Any], HeatmapJob]] = []
        if inputs:
            out = self._infer(inputs)
            for i, w in enumerate(inputs):
                record = self.outcomes.record(w, out.probabilities[i])
                job = self.outcomes.explain(record, w, out, i)
                if job is not None:
                    heatmaps.append((record, job))
                outcomes.append((w.row_id, "ok", record))
        written = None
        if heatmaps and self._heatmaps is not None:
            written = self._heatmaps.submit_many([job for _, job in heatmaps])
            written.add_done_callback(lambda _f: self._wake.set())
        for w in batch:
            if w.kind == "error":
                logger.warning("%s: error: %s", w.rel, w.error)
                outcomes.append((w.row_id, "error", self.outcomes.record(w, None)))
        return _Begun(batch, outcomes, heatmaps, written)

    def _commit(self, batch: list[Work]) -> None:
        """Infer, record outcomes in the ledger, write reports, archive: all before it
        returns (``_drain``, once no batch is begun; the loop instead overlaps a batch's
        heatmaps with the next inference)."""
        self._finish(self._begin(batch))

    def finish_begun(self, keep: int = 0) -> None:
        """Finish begun batches, oldest first, until ``keep`` are left. One that cannot be
        finished (its exception is raised) stays first in line: none after it is recorded
        before it, and :meth:`_drain` tries it again."""
        while len(self.begun) > keep:
            self._finish(self.begun[0])
            self.begun.pop(0)

    def _finish(self, begun: _Begun) -> None:
        """Record a begun batch once its heatmaps are written: the ledger, then the reports
        and the archive. A result whose heatmap failed is held back (:mod:`.overlays`)."""
        batch, outcomes = begun.batch, begun.outcomes
        if begun.written is not None:
            paths = begun.written.result()  # every heatmap written (or failed) before the ledger
            held: set[int] = set()
            for (record, job), path in zip(begun.heatmaps, paths, strict=True):
                if path is not None:
                    record["heatmap"] = path.relative_to(self.config.reports).as_posix()
                    continue
                outcome = next(o for o in outcomes if o[2] is record)
                work = next(w for w in batch if w.row_id == outcome[0])
                if self.overlays.hold(work, outcome, job, "not written (see the error above)"):
                    held.add(work.row_id)
            if held:
                batch = [w for w in batch if w.row_id not in held]
                outcomes = [o for o in outcomes if o[0] not in held]
                self.standing.overlays_held = len(self.overlays)
        self._record(batch, outcomes)

    def retry_overlays(self, now: float) -> None:
        """Write the held heatmaps that are due; record the results they belong to."""
        if self.overlays.due(now):
            self._record_ready(self.overlays.retry(now))

    def _record_ready(self, ready: list[tuple[Work, tuple[int, str, dict[str, Any]]]]) -> None:
        if ready:
            self._record([w for w, _ in ready], [o for _, o in ready])
        self.standing.overlays_held = len(self.overlays)

    def _record(self, batch: list[Work], outcomes: list[tuple[int, str, dict[str, Any]]]) -> None:
        """The ledger (retried with back-off), then the reports and the archive."""
        backoff = 1.0
        while True:
            try:
                self.ledger.finish(outcomes, self.finish_hooks)
                self.standing.ledger_error = None
                break
            except Exception as exc:  # sqlite3.OperationalError: disk full, I/O error
                self.standing.ledger_error = f"cannot record outcomes in the ledger ({exc})"
                logger.error(
                    "cannot record outcomes in the ledger (%s); retrying in %.0f s", exc, backoff
                )
                if self._stop.is_set() and backoff > RETRY_MAX_SECONDS:
                    raise LedgerError(f"cannot record outcomes in the ledger: {exc}") from exc
                self.liveness.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS * 2)
        for _, state, record in outcomes:
            self.standing.counts[state] += 1
            if state == "ok":
                flag = record.get("flag") or ""
                logger.info(
                    "%s: %s (%.3f)%s", record["file"], record["label"], record["confidence"],
                    f", flagged {flag}: {record.get('flag_reason') or ''}" if flag else "",
                    extra={"flag": flag},  # a field of its own in JSON logs
                )  # fmt: skip
        for w in batch:
            if w.kind in ("input", "error"):
                self.delivery.archive_later(w, w.kind == "input")
        self.delivery.flush()

    @staticmethod
    def _or_give_up(record: Callable[[Any], None], batch: Any, files: int) -> None:
        """At shutdown: ``record(batch)``; if it fails, log why and give it up (its files
        stay claimed and are taken again at the next start), so the batches after it go on."""
        try:
            record(batch)
        except XRWatchError as exc:
            logger.error("giving up on %d file(s) at shutdown: %s", files, exc)
        except Exception:  # a bug; the batches after it are still recorded
            logger.exception("giving up on %d file(s) at shutdown", files)

    def drain(self) -> None:
        """At shutdown: finish the begun batches, then infer and record the rest."""
        while self.begun:  # oldest first; one that fails is given up, the others go on
            begun = self.begun.pop(0)
            self._or_give_up(self._finish, begun, len(begun.batch))
        while self.batch:
            batch, self.batch = (
                self.batch[: self.config.batch_size],
                self.batch[self.config.batch_size :],
            )
            self._or_give_up(self._commit, batch, len(batch))
        # held results: their heatmaps tried once more; with --once, the rest recorded
        # without (nothing is left for a later start); else they stay claimed for it
        ready = self.overlays.retry(time.monotonic(), last=True)
        if self.config.once:
            ready += self.overlays.give_up()
        self._or_give_up(self._record_ready, ready, len(ready))
