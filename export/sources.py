"""Which checkpoint to export: a checkpoint file, a run folder, or the best run of many."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xrwatch.errors import ConfigError, ModelError
from xrwatch_training.checkpoint import load_checkpoint
from xrwatch_training.ranking import (
    RunScore,
    comparable_groups,
    comparison_key,
    mixed_groups_message,
    rank,
)

logger = logging.getLogger(__name__)

BEST = "best.pt"  # a run folder's best-validation checkpoint (written by training)
LAST = "last.pt"


@dataclass(frozen=True)
class Candidate:
    """One run's best checkpoint and the score it is ranked by."""

    path: Path
    score: float  # best validation balanced accuracy
    arch: str
    experiment: str
    epoch: int
    classes: tuple[str, ...] = ()
    val_loss: float | None = None  # at that epoch: the tie-breaker
    key: tuple[tuple[str, Any], ...] = ()  # training.ranking.comparison_key

    def run_score(self) -> RunScore:
        return RunScore(str(self.path.parent), self.score, self.val_loss, self.key)


@dataclass(frozen=True)
class Selection:
    """The checkpoint to export and why it was chosen."""

    path: Path
    reason: str
    candidates: tuple[Candidate, ...] = ()


def resolve_source(source: Path) -> Selection:
    """A checkpoint file as is; a run folder → its ``best.pt`` (else ``last.pt``)."""
    if source.is_file():
        return Selection(source, f"checkpoint {source} given")
    if source.is_dir():
        for name in (BEST, LAST):
            if (source / name).is_file():
                return Selection(source / name, f"{name} of run folder {source}")
        raise ConfigError(
            f"{source}: run folder has no {BEST} or {LAST}; to pick the best of several runs "
            "pass the runs folder with --best"
        )
    raise ConfigError(f"{source}: no such checkpoint file or run folder")


def _score(ckpt: dict[str, Any]) -> float:
    value = ckpt.get("best_val_balanced_accuracy")
    if value is None:
        value = ((ckpt.get("metrics") or {}).get("val") or {}).get("balanced_accuracy")
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return -math.inf
    return score if math.isfinite(score) else -math.inf


def find_best(runs_dir: Path) -> Selection:
    """The run under ``runs_dir`` with the best validation balanced accuracy.

    Every ``best.pt`` below ``runs_dir`` is a candidate; unreadable ones are skipped with a
    warning. Runs on different classes, data or splits are refused rather than ranked
    together; ranking and ties follow :mod:`training.ranking`, as ``table1.md`` does.
    """
    if not runs_dir.is_dir():
        raise ConfigError(f"{runs_dir}: --best needs a folder of runs")
    candidates: list[Candidate] = []
    for path in sorted(runs_dir.rglob(BEST)):
        try:
            ckpt = load_checkpoint(path)
        except ModelError as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        val = (ckpt.get("metrics") or {}).get("val") or {}
        candidates.append(
            Candidate(
                path,
                _score(ckpt),
                ckpt["arch"],
                ckpt["experiment"],
                int(ckpt["epoch"]),
                tuple(ckpt["classes"]),
                val.get("loss"),
                comparison_key(ckpt.get("config") or {}, ckpt["classes"]),
            )
        )
    if not candidates:
        raise ConfigError(f"{runs_dir}: no readable {BEST} checkpoints found below it")
    groups = comparable_groups(candidates, Candidate.run_score)
    if len(groups) > 1:
        raise ConfigError(
            f"{runs_dir}: --best: {mixed_groups_message(groups, Candidate.run_score)}\n"
            "Pass a folder that holds one group's runs."
        )
    ranked = rank(candidates, Candidate.run_score)
    best = ranked[0]
    reason = (
        f"run {best.path.parent} ({best.arch}, {best.experiment}, epoch {best.epoch}) has the "
        f"best validation balanced accuracy, {best.score:.4f}, of {len(ranked)} run(s)"
    )
    if len(ranked) > 1:
        runner = ranked[1]
        reason += f"; next best {runner.path.parent} at {runner.score:.4f}"
        if runner.score == best.score:
            reason += " (a tie, broken by the lower validation loss, then the run path)"
    return Selection(best.path, reason, tuple(ranked))
