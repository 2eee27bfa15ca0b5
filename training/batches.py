"""The data as the training loop sees it: splits as tensors on the device, drawn in batches.

Owns the way from a :class:`TrainConfig` to tensors - index, splits, the decoded-image
cache (rank 0 decodes, the other ranks then read it), unreadable files listed in
``skipped_files.csv`` (or refused with ``--strict``), the split files written - and each
epoch's batches: the seeded sample order (plain or class-balanced), each rank's equal
share of the global batch, and the per-image flips and rotations applied as tensors on the
device with an RNG seeded per epoch and rank (so ``--resume`` draws what an uninterrupted
run would).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xrwatch.errors import DatasetError
from xrwatch.preprocess import PreprocessSpec

from .cache import build_cache
from .data import Sample, extra_samples, index_dataset
from .distributed import Dist
from .presets import TrainConfig
from .report import write_json
from .splits import Splits, make_splits, write_split_files

logger = logging.getLogger(__name__)


def preprocess_spec(cfg: TrainConfig) -> PreprocessSpec:
    """The preprocessing a run's images get (the cache's, and the model's metadata)."""
    return PreprocessSpec(size=cfg.image_size, resize=cfg.resize, aspect=cfg.aspect)


# --------------------------------------------------------------------------- data
@dataclass
class SplitTensors:
    """One split, whole, on the training device."""

    images: torch.Tensor  # N x 1 x S x S float16 in [0, 1] (on the training device)
    labels: torch.Tensor  # N int64 (on the training device)


def prepare_data(
    cfg: TrainConfig, d: Dist, run_dir: Path, device: torch.device
) -> tuple[tuple[str, ...], dict[str, SplitTensors], Splits]:
    """``(classes, {"train"|"val"|"test": tensors}, the splits kept)``: unreadable images
    left out (listed in ``skipped_files.csv``), the kept splits written to ``run_dir``."""
    index = index_dataset(cfg.data, cfg.task, patients=cfg.patients)
    extra: list[Sample] = []
    for extra_spec in cfg.extra:
        extra += extra_samples(extra_spec, cfg.task)
    splits = make_splits(
        index,
        cfg.split,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        extra=extra,
    )
    if d.main:
        for note, count in index.excluded.items():
            logger.info("left out %d image(s): %s", count, note)
        for w in splits.warnings:
            logger.warning("%s", w)
        shared = splits.shared_patients()
        logger.info(
            "patients per split: %s; %s",
            splits.patients(),
            f"{len(shared)} in two splits" if shared else "none in two splits",
        )
    spec = preprocess_spec(cfg)
    all_paths = sorted({str(s.path) for part in splits.by_name().values() for s in part})
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / ".cache"
    # Rank 0 decodes; the others wait, then find the finished cache.
    if d.main:
        cache = build_cache(all_paths, spec, cache_dir, workers=cfg.workers)
    d.barrier()
    if not d.main:
        cache = build_cache(all_paths, spec, cache_dir, workers=cfg.workers)
    if cache.failures:
        if d.main:
            _write_skipped(cache.failures, run_dir / "skipped_files.csv")
            logger.warning(
                "%d image(s) missing or unreadable, listed in %s%s",
                len(cache.failures),
                run_dir / "skipped_files.csv",
                "" if cfg.strict else " and left out",
            )
        if cfg.strict:
            first = next(iter(cache.failures.items()))
            raise DatasetError(
                f"{len(cache.failures)} image(s) missing or unreadable (--strict), e.g. "
                f"{first[0]}: {first[1]}; full list in {run_dir / 'skipped_files.csv'}"
            )
    position = {p: i for i, p in enumerate(cache.paths)}

    def readable(part: list[Sample]) -> list[Sample]:
        return [s for s in part if cache.ok[position[str(Path(s.path).resolve())]]]

    kept = Splits(
        readable(splits.train), readable(splits.val), readable(splits.test), splits.warnings
    )
    if d.main:
        write_split_files(kept, run_dir)
        counts = kept.counts(index.classes)
        write_json(run_dir / "splits" / "counts.json", counts)
        logger.info("split sizes (per class): %s", counts)
    if not kept.train:
        raise DatasetError(f"{cfg.data}: no readable training image (see skipped_files.csv)")
    if not kept.val:
        raise DatasetError(
            f"{cfg.data}: the validation split is empty (val_fraction={cfg.val_fraction}, "
            f"{len(kept.train)} training images); the best checkpoint is chosen on it"
        )
    class_index = {c: i for i, c in enumerate(index.classes)}
    tensors = {}
    size = cache.images.shape[1:]
    for name, part in kept.by_name().items():
        rows = np.array([position[str(Path(s.path).resolve())] for s in part], dtype=np.int64)
        imgs = np.asarray(cache.images[rows]) if len(rows) else np.zeros((0, *size), np.float16)
        labels = torch.tensor([class_index[s.label] for s in part], dtype=torch.long)
        tensors[name] = SplitTensors(
            torch.from_numpy(imgs).unsqueeze(1).to(device), labels.to(device)
        )
    return index.classes, tensors, kept


def _write_skipped(failures: dict[str, str], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        for p, reason in sorted(failures.items()):
            w.writerow([p, reason])


# --------------------------------------------------------------------------- batches
def epoch_order(
    labels: torch.Tensor, cfg: TrainConfig, epoch: int, num_classes: int
) -> torch.Tensor:
    """The sample order of ``epoch``: seeded, the same on every rank (:func:`rank_batches`)."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    n = len(labels)
    if cfg.sampler == "weighted":
        # WeightedRandomSampler with 1/class-count weights: each class drawn equally often.
        counts = torch.bincount(labels.cpu(), minlength=num_classes).clamp(min=1).float()
        weights = 1.0 / counts[labels.cpu()]
        return torch.multinomial(weights, n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


def rank_batches(order: torch.Tensor, batch_size: int, d: Dist) -> list[torch.Tensor]:
    """This rank's batches: ``batch_size`` is the *global* batch (the recipe's), so each step
    takes the next ``batch_size`` samples of the epoch's order and gives each of the ``d.world``
    processes an equal share. DDP averages the gradients, so the step is that of one process
    on the whole batch, at the same learning rate. A last short batch is shared out equally
    (a remainder below ``d.world`` dropped); one under 2 images per process is dropped
    (BatchNorm cannot train on one image)."""
    out = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        per = len(chunk) // d.world
        if per < 2:
            break
        out.append(chunk[d.rank * per : (d.rank + 1) * per])
    return out


def augment_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The augmentation RNG of one epoch on one rank: seeded afresh each epoch, so that
    ``--resume`` draws exactly the flips and rotations an uninterrupted run would."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def augment(x: torch.Tensor, cfg: TrainConfig, g: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips and rotations of a batch N x 1 x H x W, per image."""
    n = x.shape[0]
    r = torch.rand(4, n, generator=g).to(x.device)
    x = torch.where((r[0] < cfg.hflip)[:, None, None, None], x.flip(3), x)
    x = torch.where((r[1] < cfg.vflip)[:, None, None, None], x.flip(2), x)
    rotate = r[2] < cfg.rotation_p
    if cfg.rotation_degrees > 0 and bool(rotate.any()):
        angle = (r[3][rotate] * 2 - 1) * math.radians(cfg.rotation_degrees)
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack(
            [torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1
        )
        sub = x[rotate]
        grid = F.affine_grid(theta.to(sub.dtype), list(sub.shape), align_corners=False)
        x = x.clone()
        x[rotate] = F.grid_sample(
            sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
    return x
