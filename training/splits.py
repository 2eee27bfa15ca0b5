"""Seeded train/validation/test splits, stratified by class and grouped by patient. Torch-free.

* ``official``: TEST stays the test set; validation is carved from TRAIN. CoronaHack's TEST
  holds no COVID-19 image, so COVID-19 is never tested (a warning says so).
* ``patient``: validation *and* test are carved from TRAIN, so COVID-19 is tested too
  (CoronaHack's own TEST is then not used).
* ``auto`` (the default): ``official`` when the dataset has a fixed test set (CoronaHack's
  TEST, or ``DATA/test/<Class>``), else ``patient`` (a plain folder per class).

Carving works on patient groups (:func:`training.data.patient_group`; Kermany patients are
qualified by the CoronaHack split, as Kermany numbers train and test patients separately): a
group goes whole into one split, so no patient sits in two. Groups are assigned per class (by
the group's majority class) until the class's share reaches the requested fraction.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from xrwatch.errors import DatasetError

from .data import DatasetIndex, Sample

logger = logging.getLogger(__name__)

SplitMode = Literal["auto", "official", "patient"]
SPLIT_MODES: tuple[SplitMode, ...] = ("auto", "official", "patient")
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Splits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    warnings: list[str] = field(default_factory=list)
    mode: str = ""  # the split used (official or patient), ``auto`` resolved
    why: str = ""  # why that split: asked for, or chosen by layout

    def by_name(self) -> dict[str, list[Sample]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def patients(self) -> dict[str, int]:
        """How many patient groups each split holds."""
        return {name: len({s.group for s in part}) for name, part in self.by_name().items()}

    def shared_patients(self) -> list[str]:
        """The patient groups found in more than one split (sorted; empty when disjoint)."""
        where: dict[str, set[str]] = defaultdict(set)
        for name, part in self.by_name().items():
            for s in part:
                where[s.group].add(name)
        return sorted(g for g, names in where.items() if len(names) > 1)

    def counts(self, classes: tuple[str, ...]) -> dict[str, dict[str, int]]:
        out = {}
        for name, samples in self.by_name().items():
            c = Counter(s.label for s in samples)
            out[name] = {k: c.get(k, 0) for k in classes}
        return out


def carve(
    samples: list[Sample], fraction: float, rng: np.random.Generator
) -> tuple[list[Sample], list[Sample]]:
    """Split ``samples`` into (rest, carved) with about ``fraction`` of each class carved."""
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"split fraction must be in [0, 1), got {fraction}")
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s)
    by_class: dict[str, list[str]] = defaultdict(list)
    for g in sorted(groups):
        majority = Counter(s.label for s in groups[g]).most_common(1)[0][0]
        by_class[majority].append(g)
    carved_groups: set[str] = set()
    for label in sorted(by_class):
        names = by_class[label]
        order = rng.permutation(len(names))
        total = sum(len(groups[n]) for n in names)
        target = round(fraction * total)
        taken = 0
        for i in order:
            if taken >= target or len(names) < 2:
                break
            carved_groups.add(names[i])
            taken += len(groups[names[i]])
    rest = [s for s in samples if s.group not in carved_groups]
    carved = [s for s in samples if s.group in carved_groups]
    return rest, carved


def resolve_split(index: DatasetIndex, mode: str) -> tuple[str, str]:
    """``(official|patient, why)``: ``auto`` picks the split that works for the layout."""
    if mode not in SPLIT_MODES:
        raise DatasetError(f"Invalid split {mode!r}. Only {', '.join(SPLIT_MODES)} are supported.")
    if mode != "auto":
        return mode, f"--split {mode} as asked"
    if any(s.source_split == "TEST" for s in index.samples):
        fixed = "CoronaHack's TEST" if index.kind == "coronahack" else "DATA/test/<Class>"
        return "official", f"--split auto: the dataset has a fixed test set ({fixed}), used as is"
    return "patient", (
        "--split auto: the dataset has no fixed test set, so validation and test are carved "
        "from its images, grouped by patient"
    )


def make_splits(
    index: DatasetIndex,
    mode: str,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    extra: list[Sample] | None = None,
) -> Splits:
    """The train/val/test splits of ``index`` (see the module docstring)."""
    mode, why = resolve_split(index, mode)
    rng = np.random.default_rng(seed)
    has_official = any(s.source_split == "TEST" for s in index.samples)
    pool = [s for s in index.samples if s.source_split in ("TRAIN", None)]
    warnings: list[str] = list(index.warnings)
    if mode == "official":
        if not has_official:
            raise DatasetError(
                f"{index.root}: --split official needs a fixed test set (CoronaHack TEST, or "
                "DATA/test/<Class>); use --split patient to carve one from the training images"
            )
        test = [s for s in index.samples if s.source_split == "TEST"]
    else:
        pool, test = carve(pool, test_fraction, rng)
        if has_official:
            warnings.append(
                "--split patient: the test set is carved from TRAIN; the dataset's own TEST "
                "split is not used"
            )
    train, val = carve(pool, val_fraction, rng)
    train += list(extra or [])
    test_counts = Counter(s.label for s in test)
    absent = [c for c in index.classes if test_counts.get(c, 0) == 0]
    if absent:
        warnings.append(
            f"the test set holds no {', '.join(absent)} image: those classes are not tested"
            + (
                " (use --split patient to carve a test set that has them)"
                if mode == "official"
                else ""
            )
        )
    _check_disjoint(train, val, test)
    return Splits(train, val, test, warnings, mode, why)


def _check_disjoint(train: list[Sample], val: list[Sample], test: list[Sample]) -> None:
    seen: dict[str, str] = {}
    for name, samples in (("train", train), ("val", val), ("test", test)):
        for s in samples:
            prev = seen.setdefault(s.group, name)
            if prev != name and s.source_split != "TEST":
                # official TEST is the dataset's own choice; only our carving must be disjoint
                raise AssertionError(f"patient group {s.group!r} in both {prev} and {name}")


def write_split_files(splits: Splits, run_dir: Path) -> None:
    """Save the file lists (``splits/train.csv`` ...) in the run folder."""
    out = run_dir / "splits"
    out.mkdir(parents=True, exist_ok=True)
    for name, samples in splits.by_name().items():
        with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "fine_label", "group", "source_split"])
            for s in samples:
                w.writerow([str(s.path), s.label, s.fine, s.group, s.source_split or ""])
