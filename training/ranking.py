"""Which run is best: the one rule ``table1.md`` and ``xrwatch export --best`` share. Torch-free.

Runs are ranked by their best epoch's **validation** balanced accuracy (never the test set).
Ties go to the lower validation loss at that epoch (the better-calibrated model), then to
the run path in sorting order, so the same runs always give the same winner.

Scores compare only between runs evaluated on the same validation set: the same classes and
the same split of the same data (data folder, ``--split``, fractions, seed, patients table).
:func:`comparable_groups` groups runs by that key; callers refuse a mix and list the groups.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

# The config fields that decide which images the validation (and test) split holds.
SPLIT_FIELDS = ("data", "task", "split", "val_fraction", "test_fraction", "seed", "patients")


@dataclass(frozen=True)
class RunScore:
    """What ranking needs of one run."""

    run: str  # the run folder (or checkpoint) path, the last tie-breaker
    score: float | None  # best validation balanced accuracy
    val_loss: float | None  # validation loss at that epoch
    key: tuple[tuple[str, Any], ...]  # comparison group (see comparison_key)


def comparison_key(config: dict[str, Any], classes: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """The group a run's validation score compares within: classes and the split's inputs."""
    key: list[tuple[str, Any]] = [("classes", tuple(classes))]
    for name in SPLIT_FIELDS:
        value = config.get(name)
        if name in ("data", "patients") and isinstance(value, str) and value:
            value = os.path.normpath(value)
        key.append((name, value))
    return tuple(key)


def describe_key(key: tuple[tuple[str, Any], ...]) -> str:
    parts = []
    for name, value in key:
        shown = ", ".join(value) if name == "classes" else value
        parts.append(f"{name} {shown}")
    return "; ".join(parts)


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def sort_key(r: RunScore) -> tuple[float, float, str]:
    """Best first: higher score, then lower validation loss, then the run path."""
    score, loss = _finite(r.score), _finite(r.val_loss)
    return (
        -score if score is not None else math.inf,
        loss if loss is not None else math.inf,
        r.run,
    )


T = TypeVar("T")


def rank(items: Sequence[T], score_of: Callable[[T], RunScore]) -> list[T]:
    """``items`` best first by :func:`sort_key` of their :class:`RunScore`."""
    return sorted(items, key=lambda item: sort_key(score_of(item)))


def comparable_groups(
    items: Sequence[T], score_of: Callable[[T], RunScore]
) -> dict[tuple[tuple[str, Any], ...], list[T]]:
    """``items`` grouped by comparison key (in first-seen order)."""
    groups: dict[tuple[tuple[str, Any], ...], list[T]] = {}
    for item in items:
        groups.setdefault(score_of(item).key, []).append(item)
    return groups


def mixed_groups_message(
    groups: dict[tuple[tuple[str, Any], ...], list[T]], score_of: Callable[[T], RunScore]
) -> str:
    """Why runs of several groups are not ranked together, naming each group."""
    first = next(iter(groups))
    differing = [
        name
        for i, (name, _value) in enumerate(first)
        if any(key[i][1] != first[i][1] for key in groups)
    ]
    lines = [
        "validation balanced accuracies of runs on different classes, data or splits are not "
        f"comparable (they differ in {', '.join(differing)}; a different seed carves a "
        "different split), so they are not ranked together:"
    ]
    for key, members in groups.items():
        shown = {name: value for name, value in key if name in differing}
        example = score_of(members[0]).run
        lines.append(
            f"  {describe_key(tuple(shown.items()))}: {len(members)} run(s), e.g. {example}"
        )
    return "\n".join(lines)
