"""One epoch on the device: the training step over a split's batches, and evaluation.

Owns mixed precision (bf16 autocast where the GPU has it, else fp16 with loss scaling;
fp32 on a CPU), :func:`train_one_epoch` (this rank's batches, augmented, through the
optimizer; loss and accuracy summed over every rank) and :func:`evaluate` (a whole split,
the ranks sharing it, probabilities gathered back in the split's order).
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .batches import SplitTensors, augment, epoch_order, rank_batches
from .distributed import Dist
from .presets import TrainConfig

logger = logging.getLogger(__name__)


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
    """Train ``model`` for one epoch on this rank's batches; the epoch's row of metrics.csv
    (loss and accuracy over every rank's batches, images per second)."""
    model.train()
    batches = rank_batches(epoch_order(data.labels, cfg, epoch, num_classes), cfg.batch_size, d)
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
