"""The training loop: one run folder per call of :func:`train`.

Reads top to bottom: set-up (distributed, device, run folder), data (index → splits →
decoded-image cache → tensors), model, loop (train one epoch, evaluate, checkpoint), final
test of the best checkpoint and the run folder's artefacts. Works alone or under
``torchrun`` (DistributedDataParallel; rank 0 writes everything).

Data never goes through a DataLoader: every image is decoded and resized once into the
cache, the whole split then sits in memory (on the GPU when there is one), and batches are
gathered and augmented (flips, rotation) as tensors on the device, so the GPU, not JPEG
decoding, bounds the speed.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xrwatch.config import build_config
from xrwatch.errors import ConfigError, DatasetError
from xrwatch.metrics_ci import bootstrap_ci, coverage_note, format_ci, missing_classes
from xrwatch.preprocess import PreprocessSpec

from .cache import build_cache
from .checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from .data import Sample, extra_samples, index_dataset
from .labels import TASK_CLASSES
from .losses import build_loss
from .metrics import classification_metrics
from .models import build_model, wrap
from .presets import TrainConfig
from .report import (
    plot_confusion,
    plot_curves,
    read_metrics_csv,
    write_json,
    write_metrics_csv,
)
from .splits import Splits, make_splits, resolve_split, write_split_files
from .weights import load_pretrained

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- set-up
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _resolve_device(cfg: TrainConfig) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _broadcast(obj: Any, d: Dist) -> Any:
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def preprocess_spec(cfg: TrainConfig) -> PreprocessSpec:
    return PreprocessSpec(size=cfg.image_size, resize=cfg.resize, aspect=cfg.aspect)


# --------------------------------------------------------------------------- data
@dataclass
class SplitTensors:
    images: torch.Tensor  # N x 1 x S x S float16 in [0, 1] (on the training device)
    labels: torch.Tensor  # N int64 (on the training device)


def _prepare_data(
    cfg: TrainConfig, d: Dist, run_dir: Path, device: torch.device
) -> tuple[tuple[str, ...], dict[str, SplitTensors], Splits]:
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
    _barrier(d)
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
def _epoch_order(
    labels: torch.Tensor, cfg: TrainConfig, epoch: int, num_classes: int
) -> torch.Tensor:
    """The sample order of ``epoch``: seeded, the same on every rank (:func:`_rank_batches`)."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    n = len(labels)
    if cfg.sampler == "weighted":
        # WeightedRandomSampler with 1/class-count weights: each class drawn equally often.
        counts = torch.bincount(labels.cpu(), minlength=num_classes).clamp(min=1).float()
        weights = 1.0 / counts[labels.cpu()]
        return torch.multinomial(weights, n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


def _rank_batches(order: torch.Tensor, batch_size: int, d: Dist) -> list[torch.Tensor]:
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


def _augment_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
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


# --------------------------------------------------------------------------- loop
def _autocast(device: torch.device, cfg: TrainConfig) -> AbstractContextManager[Any]:
    if device.type == "cuda" and cfg.amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def grad_scaler(device: torch.device, cfg: TrainConfig) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast only: bf16 (and fp32 on a CPU) needs none."""
    enabled = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=enabled)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: SplitTensors,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    d: Dist,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, probabilities, mean loss) over the whole split; ranks share the work."""
    model.eval()
    n = len(data.labels)
    mine = torch.arange(d.rank, n, d.world)
    probs, losses = [], []
    for start in range(0, len(mine), cfg.batch_size * 2):
        idx = mine[start : start + cfg.batch_size * 2].to(device)
        x = data.images[idx].float()
        with _autocast(device, cfg):
            logits = model(x)
        losses.append(
            float(F.cross_entropy(logits.float(), data.labels[idx], reduction="sum"))
            if isinstance(loss_fn, nn.CrossEntropyLoss)
            else float(loss_fn(logits.float(), data.labels[idx])) * len(idx)
        )
        probs.append(torch.softmax(logits.float(), 1).cpu())
    p = torch.cat(probs) if probs else torch.zeros(0, 1)
    parts = [(mine, p, sum(losses))]
    if d.world > 1:
        gathered: list[Any] = [None] * d.world
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    order = torch.cat([pp[0] for pp in parts])
    all_probs = torch.cat([pp[1] for pp in parts if len(pp[1])])[order.argsort()]
    total_loss = sum(pp[2] for pp in parts)
    return data.labels.cpu().numpy(), all_probs.numpy(), total_loss / max(n, 1)


def _progress(cfg: TrainConfig, d: Dist) -> Any:
    if not (cfg.progress and d.main and sys.stderr.isatty()):
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        transient=False,
    )


def _default_name(cfg: TrainConfig) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.experiment}-{cfg.task}-{stamp}"


def resolve_split_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``split = auto`` resolved for its data's layout (official when it has a
    fixed test set, else patient), so config.json records the split that ran."""
    if cfg.split != "auto" or not cfg.data:
        return cfg
    mode, why = resolve_split(index_dataset(cfg.data, cfg.task, patients=cfg.patients), "auto")
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("split: %s (%s)", mode, why)
    return replace(cfg, split=mode)  # type: ignore[arg-type]


def load_run_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of an existing run folder (``config.json``), with ``overrides``."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.json)")
    values = json.loads(path.read_text(encoding="utf-8"))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(TrainConfig, values, source=str(path))


def record_config(run_dir: Path, cfg: TrainConfig, *, event: str) -> None:
    """Keep ``config.json`` the config that is running (e.g. after ``--resume --epochs N``);
    each change is appended to ``config_history.jsonl`` (time, event, field: [old, new])."""
    path = run_dir / "config.json"
    stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    new = cfg.to_dict()
    changed = {k: [stored.get(k), v] for k, v in new.items() if stored.get(k) != v}
    if not changed:
        return
    entry = {
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "event": event,
        "changed": changed,
    }
    with (run_dir / "config_history.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    write_json(path, new)
    logger.info(
        "%s: config.json updated (%s)",
        run_dir,
        ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
    )


@contextmanager
def hold_run_folder(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on ``run_dir`` for this process's lifetime in it: two processes
    writing one run folder (a ``--resume`` of a run still training) would interleave its
    checkpoints and metrics."""
    import fcntl

    fh = (run_dir / ".lock").open("a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise ConfigError(
                f"{run_dir} is in use by another training process ({holder}); wait for it "
                "to finish or stop it (Ctrl-C keeps last.pt, the last completed epoch) "
                "before --resume"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the lock


def train(cfg: TrainConfig, *, resume: str | Path | None = None) -> Path:
    """Run (or with ``resume``, continue) one training run; returns its run folder."""
    with ExitStack() as locks:
        return _train(cfg, resume=resume, locks=locks)


def _train(cfg: TrainConfig, *, resume: str | Path | None, locks: ExitStack) -> Path:
    device_kind = _resolve_device(cfg)
    d = _init_distributed(device_kind)
    if cfg.batch_size % d.world:
        raise ConfigError(
            f"batch size {cfg.batch_size} is the global batch and must divide across the "
            f"{d.world} processes: use a multiple of {d.world}"
        )
    cfg = replace(cfg, world_size=d.world)
    device = torch.device(f"cuda:{d.local_rank}" if device_kind == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Seeded before the model is built: a new head (and a from-scratch backbone) is drawn
    # from torch's global RNG, so the same seed gives the same initial weights.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    # Weights first: a missing weight file stops the run before any folder is written.
    backbone = build_model(cfg.arch, len(TASK_CLASSES[cfg.task]))
    # --resume of a run stopped before its first epoch ended: nothing was saved, start afresh
    fresh = resume is None or not (Path(resume) / "last.pt").is_file()
    if fresh:
        load_pretrained(backbone, cfg.arch, cfg.weights, cfg)

    if resume is not None:
        run_dir = Path(resume)
        cfg = replace(cfg, name=run_dir.name, out=str(run_dir.parent))
        if d.main and run_dir.is_dir():
            locks.enter_context(hold_run_folder(run_dir))
        cfg = resolve_split_config(cfg)  # when its config.json says auto
        if d.main and run_dir.is_dir():
            record_config(run_dir, cfg, event="resume")
    else:
        cfg = resolve_split_config(cfg)  # config.json records the split that runs
        name = _broadcast(cfg.name or _default_name(cfg), d)
        cfg = replace(cfg, name=name)
        run_dir = Path(cfg.out) / name
        if d.main:
            if (run_dir / "config.json").exists():
                raise ConfigError(
                    f"{run_dir} already holds a run; use --resume {run_dir} or --name"
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            locks.enter_context(hold_run_folder(run_dir))
            write_json(run_dir / "config.json", cfg.to_dict())
    _barrier(d)

    if d.main:
        logger.info(
            "run %s: %s on %s, %d process(es), global batch %d (%d per process)",
            run_dir, cfg.experiment, device, d.world, cfg.batch_size, cfg.batch_size // d.world,
        )  # fmt: skip
    classes, data, splits = _prepare_data(cfg, d, run_dir, device)
    spec = preprocess_spec(cfg)
    model: nn.Module = wrap(backbone, spec.to_dict()).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma
    )
    scaler = grad_scaler(device, cfg)
    loss_fn = build_loss(cfg.loss, len(classes), gamma=cfg.focal_gamma, alpha=cfg.focal_alpha).to(
        device
    )

    start_epoch, best = 1, -1.0
    history: list[dict[str, Any]] = []
    if not fresh:
        ckpt = load_checkpoint(run_dir / "last.pt")
        backbone.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt.get("rng"))
        start_epoch, best = ckpt["epoch"] + 1, ckpt["best_val_balanced_accuracy"]
        # the epochs' rows as last.pt saw them (metrics.csv is written after last.pt)
        history = ckpt.get("history") or [
            r for r in read_metrics_csv(run_dir / "metrics.csv") if r["epoch"] <= ckpt["epoch"]
        ]
        if d.main:
            logger.info("resuming %s after epoch %d of %d", run_dir, ckpt["epoch"], cfg.epochs)
    elif resume is not None and d.main:
        logger.info("%s: no last.pt (stopped before epoch 1 ended); starting at epoch 1", run_dir)
    train_model: nn.Module = model
    if d.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def checkpoint(epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        ckpt = make_checkpoint(
            arch=cfg.arch, classes=list(classes), task=cfg.task, experiment=cfg.experiment,
            preprocess=spec, config=cfg.to_dict(), model_state=backbone.state_dict(),
            optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
            scaler_state=scaler.state_dict(), epoch=epoch, metrics=metrics,
            best_val_balanced_accuracy=best,
        )  # fmt: skip
        return {**ckpt, "history": copy.deepcopy(history), "rng": _rng_state()}

    progress = _progress(cfg, d)
    completed = start_epoch - 1
    try:
        with progress if progress is not None else nullcontext():
            epoch_bar = (
                progress.add_task("epochs", total=cfg.epochs, completed=completed, stats="")
                if progress
                else None
            )
            for epoch in range(start_epoch, cfg.epochs + 1):
                row = train_one_epoch(
                    train_model, data["train"], loss_fn, optimizer, scaler, cfg, device, d,
                    epoch, len(classes), _augment_generator(cfg.seed, epoch, d.rank), progress,
                )  # fmt: skip
                row["lr"] = optimizer.param_groups[0]["lr"]
                scheduler.step()
                y, p, val_loss = evaluate(model, data["val"], loss_fn, cfg, device, d)
                val = classification_metrics(y, p, classes, loss=val_loss)
                row.update(
                    val_loss=val_loss, val_accuracy=val["accuracy"],
                    val_balanced_accuracy=val["balanced_accuracy"], val_macro_f1=val["macro_f1"],
                    val_auroc_macro=val["auroc_macro"],
                )  # fmt: skip
                history.append(row)
                completed = epoch
                train_metrics = {"accuracy": row["train_accuracy"], "loss": row["train_loss"]}
                metrics = {"val": val, "test": None, "train": train_metrics}
                improved = val["balanced_accuracy"] > best
                if improved:
                    best = val["balanced_accuracy"]
                if d.main:
                    # last.pt is the epoch's commit point, so it is written last: a Ctrl-C
                    # before it redoes this epoch whole, which rewrites best.pt the same way.
                    ckpt = checkpoint(epoch, metrics)
                    if improved:  # for export: without the optimizer state (2/3 of the size)
                        save_checkpoint(_without_resume_state(ckpt), run_dir / "best.pt")
                    save_checkpoint(ckpt, run_dir / "last.pt")
                    write_metrics_csv(history, run_dir / "metrics.csv")
                    logger.info(
                        "epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f "
                        "bal.acc %.3f%s | %.0f img/s",
                        epoch, cfg.epochs, row["train_loss"], row["train_accuracy"], val_loss,
                        val["accuracy"], val["balanced_accuracy"], " (best)" if improved else "",
                        row["train_images_per_s"],
                    )  # fmt: skip
                if progress is not None and epoch_bar is not None:
                    progress.update(
                        epoch_bar, completed=epoch,
                        stats=f"val acc {val['accuracy']:.3f} "
                        f"bal.acc {val['balanced_accuracy']:.3f}",
                    )  # fmt: skip
                _barrier(d)
    except KeyboardInterrupt:
        if d.main:
            # Nothing is saved here: last.pt already holds the last completed epoch (weights,
            # optimizer, scheduler, RNG, metrics rows), and the partial epoch is discarded, so
            # --resume redoes it whole and continues exactly as an uninterrupted run would.
            logger.warning(
                "interrupted during epoch %d: that epoch is discarded; %s; continue with "
                "xrwatch train --resume %s",
                completed + 1,
                f"{run_dir / 'last.pt'} holds epoch {completed}"
                if completed
                else "no epoch had ended, so --resume starts at epoch 1",
                run_dir,
            )
        raise

    _finish(cfg, d, run_dir, classes, data, splits, backbone, model, loss_fn, device, history)
    _barrier(d)  # every rank returns only once rank 0 has written the run's artefacts
    return run_dir


def _without_resume_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """``best.pt``: what export needs; ``--resume`` reads ``last.pt``, which keeps the rest."""
    return {**ckpt, "optimizer": None, "lr_scheduler": None, "scaler": None, "rng": None}


def _rng_state() -> dict[str, Any]:
    """torch's global RNG state (CPU and CUDA). Epoch order and augmentation have their own
    seeded generators; this covers anything else drawing from the global one."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def barrier() -> None:
    """Wait for every process of a torchrun job (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Tear down the process group at the end of a command (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def train_one_epoch(
    model: nn.Module,
    data: SplitTensors,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    device: torch.device,
    d: Dist,
    epoch: int,
    num_classes: int,
    gen: torch.Generator,
    progress: Any,
) -> dict[str, Any]:
    model.train()
    batches = _rank_batches(_epoch_order(data.labels, cfg, epoch, num_classes), cfg.batch_size, d)
    if cfg.max_steps_per_epoch:
        batches = batches[: cfg.max_steps_per_epoch]
    n_batches = max(1, len(batches))
    bar = progress.add_task(f"epoch {epoch}", total=n_batches, stats="") if progress else None
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    for step, idx in enumerate(batches):
        idx = idx.to(device)
        x = augment(data.images[idx].float(), cfg, gen)
        if device.type == "cuda" and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = data.labels[idx]
        with _autocast(device, cfg):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
        if bar is not None and (step % 5 == 0 or step + 1 == n_batches):
            rate = seen * d.world / (time.perf_counter() - start)
            progress.update(
                bar, completed=step + 1,
                stats=f"loss {float(loss_sum) / seen:.4f} acc {int(correct) / seen:.3f} "
                f"{rate:.0f} img/s",
            )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    totals = torch.stack(
        [loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)]
    )
    if d.world > 1:
        dist.all_reduce(totals)
    if bar is not None:
        progress.remove_task(bar)
    total_seen = max(float(totals[2]), 1.0)
    return {
        "epoch": epoch,
        "train_loss": float(totals[0]) / total_seen,
        "train_accuracy": float(totals[1]) / total_seen,
        "train_images_per_s": total_seen / elapsed if elapsed > 0 else None,
        "epoch_seconds": elapsed,
    }


def _finish(
    cfg: TrainConfig,
    d: Dist,
    run_dir: Path,
    classes: tuple[str, ...],
    data: dict[str, SplitTensors],
    splits: Splits,
    backbone: nn.Module,
    model: nn.Module,
    loss_fn: nn.Module,
    device: torch.device,
    history: list[dict[str, Any]],
) -> None:
    """Test the best checkpoint; write test_metrics.json, curves.png, confusion_matrix.png.
    Validation and test figures get 95 % intervals by bootstrap over patients (seeded)."""
    _barrier(d)
    best_ckpt = load_checkpoint(run_dir / "best.pt")
    backbone.load_state_dict(best_ckpt["model"])
    test: dict[str, Any] | None = None
    if len(data["test"].labels):
        y, p, test_loss = evaluate(model, data["test"], loss_fn, cfg, device, d)
        test = classification_metrics(y, p, classes, loss=test_loss)
        test["ci95"] = _ci(y, p, splits.test, classes, cfg.seed)
    # validation again with the best weights: its per-image predictions give the interval
    yv, pv, _ = evaluate(model, data["val"], loss_fn, cfg, device, d)
    if not d.main:
        return
    val_at_best = {
        **best_ckpt["metrics"]["val"],
        "ci95": _ci(yv, pv, splits.val, classes, cfg.seed),
    }
    best_ckpt["metrics"]["test"] = test
    best_ckpt["metrics"]["val"] = val_at_best
    save_checkpoint(best_ckpt, run_dir / "best.pt")
    val_accs = [r["val_accuracy"] for r in history if r.get("val_accuracy") is not None]
    train_accs = [r["train_accuracy"] for r in history if r.get("train_accuracy") is not None]
    summary = {
        "experiment": cfg.experiment,
        "task": cfg.task,
        "classes": list(classes),
        "best_epoch": best_ckpt["epoch"],
        "epochs": len(history),
        "test": test,
        "test_classes_missing": missing_classes(test, classes) if test else list(classes),
        "val_at_best": val_at_best,
        # running accuracy over the epoch's augmented batches: no per-image predictions, so
        # no interval
        "train_at_best": best_ckpt["metrics"]["train"],
        # The study's figure of merit: accuracy averaged over all epochs, for comparison.
        "avg_train_accuracy_over_epochs": float(np.mean(train_accs)) if train_accs else None,
        "avg_val_accuracy_over_epochs": float(np.mean(val_accs)) if val_accs else None,
    }
    write_json(run_dir / "test_metrics.json", summary)
    plot_curves(history, run_dir / "curves.png", f"{cfg.experiment} ({cfg.arch}, {cfg.task})")
    shown = test or best_ckpt["metrics"]["val"]
    which = "test" if test else "validation"
    plot_confusion(shown["confusion_matrix"], classes, run_dir / "confusion_matrix.png",
                   f"{cfg.experiment}: best epoch {best_ckpt['epoch']}, {which} set")  # fmt: skip
    if test is not None:
        ci = test["ci95"]
        logger.info(
            "test (best epoch %d): acc %.3f %s bal.acc %.3f %s macro-F1 %.3f (95%% CI, bootstrap "
            "over %d patients)%s",
            best_ckpt["epoch"], test["accuracy"], format_ci(ci, "accuracy", percent=False),
            test["balanced_accuracy"], format_ci(ci, "balanced_accuracy", percent=False),
            test["macro_f1"], ci["patients"], coverage_note(test, classes),
        )  # fmt: skip
    logger.info("run folder: %s", run_dir)


def _ci(
    y: np.ndarray, probs: np.ndarray, samples: list[Sample], classes: tuple[str, ...], seed: int
) -> dict[str, Any]:
    """95 % bootstrap-over-patients intervals; ``samples`` are the split's, in tensor order."""
    return bootstrap_ci(
        y, probs.argmax(axis=1), [s.group for s in samples], len(classes), seed=seed
    )
