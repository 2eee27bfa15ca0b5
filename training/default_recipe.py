"""Training the packaged default: paediatric Normal / Bacteria / Virus plus a population unit.

One run folder per call of :func:`train_default` (``--resume`` continues it after the last
completed epoch exactly: the sample order and augmentations are seeded per epoch). The head
has four units: the three diagnoses and ``Adult``, learned from ``adult/`` against the
paediatric pool (:mod:`training.pool`), so that one network both diagnoses and says whether
a film looks like the population it was trained on. Export turns the fourth unit into the
``population`` output (P(adult) under the four-way softmax) and renormalises the diagnosis
over the first three (:class:`export.explain.ExplainedClassifier`).

Selection and calibration are kept apart: the epoch is chosen on ``select`` (paediatric
balanced accuracy, renormalised over the diagnoses); export fits the temperature and the
scope guard on ``calib`` (``splits/val.csv``), which chose nothing.

Every image is decoded once into the shared cache (:mod:`training.cache`); batches are
augmented as tensors (:mod:`training.pacs_augment`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xrwatch.errors import ConfigError, DatasetError
from xrwatch.preprocess import PreprocessSpec

from .cache import build_cache
from .checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from .engine import hold_run_folder
from .metrics import classification_metrics
from .models import build_model, wrap
from .pacs_augment import PacsAugment, pacs_augment
from .pool import (
    ADULT,
    DIAGNOSES,
    POPULATION,
    PoolImage,
    build_default_data,
    describe,
    write_split_files,
)
from .report import write_json, write_metrics_csv

logger = logging.getLogger(__name__)

EXPERIMENT = "paediatric-default"
# what a resumed run may change (each change is appended to config_history.jsonl): a longer
# schedule, the threads, and the augmentation (a continued run that widens, e.g., the zoom-out
# range keeps its weights and its record of what changed at which epoch)
RESUMABLE_CHANGES = {"epochs", "threads", "augment"}
UNITS = (*DIAGNOSES, ADULT)


@dataclass(frozen=True)
class DefaultConfig:
    """The default's recipe; ``config.json`` of its run folder."""

    data: str = "../shared/data/xray"
    arch: str = "mobilenet_v3_small"
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # Adam, cosine-annealed per epoch to lr * min_lr_factor
    min_lr_factor: float = 0.02
    weight_decay: float = 1e-4
    class_weighted: bool = True  # cross-entropy weights 1 / class count (normalised)
    seed: int = 0
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    max_steps_per_epoch: int | None = None  # cut epochs short (tests)
    max_images: int | None = None  # per split and population (tests)
    cache_dir: str | None = None  # default OUT/.cache
    augment: dict[str, Any] = dataclasses.field(default_factory=dict)  # PacsAugment overrides

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DefaultConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown default-recipe keys {sorted(unknown)}")
        return cls(**values)

    def augmentation(self) -> PacsAugment:
        try:
            return PacsAugment(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in self.augment.items()})  # fmt: skip
        except TypeError as exc:
            raise ConfigError(f"invalid augment settings {self.augment}: {exc}") from exc


def preprocess_spec(cfg: DefaultConfig) -> PreprocessSpec:
    """Every input resized to a square (``stretch``): no aspect ratio to learn."""
    return PreprocessSpec(size=cfg.image_size, resize="bilinear", aspect="stretch")


def _limit(images: list[PoolImage], n: int | None) -> list[PoolImage]:
    if n is None:
        return images
    out: list[PoolImage] = []
    for pop in ("paediatric", "adult"):
        out += [i for i in images if i.population == pop][:n]
    return out


def _tensors(
    images: list[PoolImage], cache: Any, position: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    keep = [i for i in images if cache.ok[position[str(i.path.resolve())]]]
    if len(keep) < len(images):
        logger.warning("%d unreadable image(s) left out", len(images) - len(keep))
    rows = np.array([position[str(i.path.resolve())] for i in keep], dtype=np.int64)
    size = cache.images.shape[1:]
    x = np.asarray(cache.images[rows]) if len(rows) else np.zeros((0, *size), np.float16)
    y = torch.tensor([UNITS.index(i.label) for i in keep], dtype=torch.long)
    return torch.from_numpy(x).unsqueeze(1), y


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    """Logits (N x 4) of inputs N x 1 x S x S."""
    model.eval()
    out = [model(x[i : i + batch].float()).double() for i in range(0, len(x), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, len(UNITS)))


def selection_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Paediatric diagnosis (renormalised over the diagnoses) and the gate's rates at 0.5."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    adult = labels == len(DIAGNOSES)
    ped = ~adult
    diag = p[ped, : len(DIAGNOSES)]
    diag = diag / diag.sum(axis=1, keepdims=True)
    m = classification_metrics(labels[ped], diag, DIAGNOSES)
    flagged = p[:, len(DIAGNOSES)] >= 0.5
    m["gate_adult_flagged"] = float(flagged[adult].mean()) if adult.any() else None
    m["gate_paediatric_flagged"] = float(flagged[ped].mean()) if ped.any() else None
    m["loss"] = float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1)).mean())
    return m


def learning_rate(cfg: DefaultConfig, epoch: int) -> float:
    """Cosine annealing from ``lr`` (epoch 1) to ``lr * min_lr_factor`` (the last epoch),
    a function of the epoch alone, so a resumed run with a new length follows the new one."""
    floor = cfg.lr * cfg.min_lr_factor
    t = (epoch - 1) / max(cfg.epochs - 1, 1)
    return floor + (cfg.lr - floor) * (1 + math.cos(math.pi * t)) / 2


def _completed_epochs(run: Path) -> int:
    history = run / "history.json"
    if not history.is_file():
        return 0
    return len(json.loads(history.read_text(encoding="utf-8")))


def train_default(cfg: DefaultConfig, out: Path, *, resume: bool = True) -> Path:
    """Train (or continue) the run in ``out``; returns it. ``best.pt`` is export's input."""
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        stack.enter_context(hold_run_folder(out))
        return _train(cfg, out, resume=resume)


def _train(cfg: DefaultConfig, run: Path, *, resume: bool) -> Path:
    stored = run / "config.json"
    if stored.is_file():
        before = json.loads(stored.read_text(encoding="utf-8"))
        now = json.loads(json.dumps(cfg.to_dict()))
        changed = {k: [before.get(k), v] for k, v in now.items() if before.get(k) != v}
        if set(changed) - RESUMABLE_CHANGES:
            raise ConfigError(
                f"{run} holds a run with another config ({', '.join(sorted(changed))} "
                "differ); use another folder"
            )
        if changed:  # e.g. --epochs: the learning-rate schedule follows the new length
            done = _completed_epochs(run)
            with (run / "config_history.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"event": "resume", "after_epoch": done,
                                     "changed": changed}) + "\n")  # fmt: skip
            logger.info("%s: config changed on resume: %s", run, changed)
    write_json(stored, cfg.to_dict())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = build_default_data(cfg.data, cfg.seed)
    data.splits = {k: _limit(v, cfg.max_images) for k, v in data.splits.items()}
    data.heldout = {k: _limit(v, cfg.max_images) for k, v in data.heldout.items()}
    write_split_files(data, run)
    for note in data.notes:
        logger.info("data %s", note)
    spec = preprocess_spec(cfg)
    paths = sorted({str(i.path.resolve()) for part in ("train", "select")
                    for i in data.splits[part]})  # fmt: skip
    cache = build_cache(paths, spec, Path(cfg.cache_dir or run.parent / ".cache"))
    position = {p: i for i, p in enumerate(cache.paths)}
    x_train, y_train = _tensors(data.splits["train"], cache, position)
    x_sel, y_sel = _tensors(data.splits["select"], cache, position)
    if not len(y_train) or not len(y_sel):
        raise DatasetError(f"{cfg.data}: no readable training or selection images")
    logger.info("train %s; select %s", describe(data.splits["train"]),
                describe(data.splits["select"]))  # fmt: skip

    torch.manual_seed(cfg.seed)
    backbone = build_model(cfg.arch, len(UNITS))
    model = wrap(backbone, spec.to_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    counts = torch.bincount(y_train, minlength=len(UNITS)).clamp(min=1).float()
    weight = (counts.sum() / (len(UNITS) * counts)) if cfg.class_weighted else None
    start, best, history = 1, -1.0, []
    if resume and (run / "last.pt").is_file():
        ckpt = load_checkpoint(run / "last.pt")
        backbone.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, best = ckpt["epoch"] + 1, ckpt["best_val_balanced_accuracy"]
        history = list(ckpt.get("history") or [])
        logger.info("resuming %s after epoch %d of %d", run, ckpt["epoch"], cfg.epochs)
    aug = cfg.augmentation()
    for epoch in range(start, cfg.epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, epoch)
        row = _epoch(model, x_train, y_train, weight, optimizer, aug, cfg, epoch)
        row["lr"] = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        sel = selection_metrics(predict(model, x_sel), y_sel.numpy())
        row.update(val_seconds=time.perf_counter() - t0, val_loss=sel["loss"],
                   val_accuracy=sel["accuracy"], val_balanced_accuracy=sel["balanced_accuracy"],
                   val_auroc_macro=sel["auroc_macro"],
                   gate_adult_flagged=sel["gate_adult_flagged"],
                   gate_paediatric_flagged=sel["gate_paediatric_flagged"])  # fmt: skip
        history.append(row)
        improved = sel["balanced_accuracy"] > best
        best = max(best, sel["balanced_accuracy"])
        ckpt = make_checkpoint(
            arch=cfg.arch, classes=list(DIAGNOSES), task="multiclass", experiment=EXPERIMENT,
            preprocess=spec, config=cfg.to_dict(), model_state=backbone.state_dict(),
            optimizer_state=optimizer.state_dict(), scheduler_state=None,
            scaler_state=None, epoch=epoch,
            metrics={"val": sel, "test": None, "train": {"accuracy": row["train_accuracy"],
                                                         "loss": row["train_loss"]}},
            best_val_balanced_accuracy=best,
        )  # fmt: skip
        ckpt["population"] = {
            "classes": [ADULT],
            "trained_on": "adult/ vs paediatric pool",
            "population": POPULATION,
        }
        ckpt["history"] = copy.deepcopy(history)
        if improved:
            save_checkpoint({**ckpt, "optimizer": None, "lr_scheduler": None}, run / "best.pt")
        save_checkpoint(ckpt, run / "last.pt")  # the epoch's commit point: written last
        write_metrics_csv(history, run / "metrics.csv")
        write_json(run / "history.json", history)  # with the gate's columns
        logger.info(
            "epoch %d/%d: train loss %.4f acc %.3f (%.0f s) | select bal.acc %.3f acc %.3f "
            "AUROC %.3f, gate adult %.2f paediatric %.2f%s",
            epoch, cfg.epochs, row["train_loss"], row["train_accuracy"], row["epoch_seconds"],
            sel["balanced_accuracy"], sel["accuracy"], sel["auroc_macro"] or float("nan"),
            sel["gate_adult_flagged"] or 0.0, sel["gate_paediatric_flagged"] or 0.0,
            " (best)" if improved else "",
        )  # fmt: skip
    (run / "done.json").write_text(
        json.dumps({"epochs": cfg.epochs, "best_select_balanced_accuracy": best}) + "\n",
        encoding="utf-8",
    )
    return run


def _epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    aug: PacsAugment,
    cfg: DefaultConfig,
    epoch: int,
) -> dict[str, Any]:
    model.train()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    g = torch.Generator().manual_seed(
        int(np.random.SeedSequence([cfg.seed, epoch]).generate_state(1)[0])
    )
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    batches = [b for b in batches if len(b) >= 2]  # BatchNorm needs two
    if cfg.max_steps_per_epoch:
        batches = batches[: cfg.max_steps_per_epoch]
    loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    for idx in batches:
        xb = pacs_augment(x[idx], aug, g)
        yb = y[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(idx)
    elapsed = time.perf_counter() - start
    return {
        "epoch": epoch,
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "train_images_per_s": seen / elapsed if elapsed > 0 else None,
        "epoch_seconds": elapsed,
    }
