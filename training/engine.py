"""The training loop: one run folder per call of :func:`train`.

Reads top to bottom: set-up (distributed, device, run folder), data (index → splits →
decoded-image cache → tensors), model, loop (train one epoch, evaluate, checkpoint), final
test of the best checkpoint and the run folder's artefacts. Works alone or under
``torchrun`` (DistributedDataParallel; rank 0 writes everything).

Data never goes through a DataLoader: every image is decoded and resized once into the
cache, the whole split then sits in memory (on the GPU when there is one), and batches are
gathered and augmented (flips, rotation) as tensors on the device, so the GPU, not JPEG
decoding, bounds the speed.

This module owns the run (set-up, resume, checkpoints, the final test and its figures);
the rooms it calls import none of it: :mod:`.distributed` (the processes),
:mod:`.runfolder` (a run folder's config and lock), :mod:`.batches` (splits as tensors,
each epoch's batches, augmentation) and :mod:`.epoch` (one epoch's training, evaluation).
"""

from __future__ import annotations

import copy
import logging
import sys
from contextlib import ExitStack, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xrwatch.errors import ConfigError
from xrwatch.metrics_ci import bootstrap_ci, coverage_note, format_ci, missing_classes

from .batches import SplitTensors, augment_generator, prepare_data, preprocess_spec
from .batches import augment as augment  # re-exported: callers import it here
from .checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from .data import Sample
from .distributed import Dist, init_distributed
from .distributed import barrier as barrier  # re-exported: callers import these here
from .distributed import shutdown_distributed as shutdown_distributed
from .epoch import evaluate, grad_scaler, train_one_epoch
from .labels import TASK_CLASSES
from .losses import build_loss
from .metrics import classification_metrics
from .models import build_model, wrap
from .presets import TrainConfig
from .report import plot_confusion, plot_curves, read_metrics_csv, write_json, write_metrics_csv
from .runfolder import default_name, hold_run_folder, record_config, resolve_split_config
from .runfolder import load_run_config as load_run_config  # re-exported
from .splits import Splits
from .weights import load_pretrained

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- set-up
def _resolve_device(cfg: TrainConfig) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


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


def train(cfg: TrainConfig, *, resume: str | Path | None = None) -> Path:
    """Run (or with ``resume``, continue) one training run; returns its run folder."""
    with ExitStack() as locks:
        return _train(cfg, resume=resume, locks=locks)


def _train(cfg: TrainConfig, *, resume: str | Path | None, locks: ExitStack) -> Path:
    device_kind = _resolve_device(cfg)
    d = init_distributed(device_kind)
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
        name = d.broadcast(cfg.name or default_name(cfg))
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
    d.barrier()

    if d.main:
        logger.info(
            "run %s: %s on %s, %d process(es), global batch %d (%d per process)",
            run_dir, cfg.experiment, device, d.world, cfg.batch_size, cfg.batch_size // d.world,
        )  # fmt: skip
    classes, data, splits = prepare_data(cfg, d, run_dir, device)
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
                    epoch, len(classes), augment_generator(cfg.seed, epoch, d.rank), progress,
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
                d.barrier()
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
    d.barrier()  # every rank returns only once rank 0 has written the run's artefacts
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
    d.barrier()
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
