"""Self-describing checkpoints (``best.pt``, ``last.pt``); the format is in DEVELOPERS.md.

A checkpoint carries everything export needs: architecture, classes, task, preprocessing
spec, the complete config, the backbone's weights and the metrics at that epoch. It holds
only tensors and JSON-like values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

import torch

from xrwatch import __version__
from xrwatch.errors import ModelError
from xrwatch.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)

FORMAT = "xrwatch-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format",
    "format_version",
    "arch",
    "classes",
    "task",
    "experiment",
    "preprocess",
    "config",
    "model",
    "epoch",
    "metrics",
    "best_val_balanced_accuracy",
    "xrwatch_version",
    "created_at",
)


def make_checkpoint(
    *,
    arch: str,
    classes: list[str],
    task: str,
    experiment: str,
    preprocess: PreprocessSpec,
    config: dict[str, Any],
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    scheduler_state: dict[str, Any] | None,
    scaler_state: dict[str, Any] | None,
    epoch: int,
    metrics: dict[str, Any],
    best_val_balanced_accuracy: float,
) -> dict[str, Any]:
    """Assemble a checkpoint dict in the documented format."""
    state = {k.removeprefix("module."): v.detach().cpu() for k, v in model_state.items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "classes": list(classes),
        "task": task,
        "experiment": experiment,
        "preprocess": preprocess.to_dict(),
        "config": config,
        "model": state,
        "optimizer": optimizer_state,
        "lr_scheduler": scheduler_state,
        "scaler": scaler_state,
        "epoch": int(epoch),
        "metrics": metrics,
        "best_val_balanced_accuracy": float(best_val_balanced_accuracy),
        "xrwatch_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write ``ckpt`` atomically (temp file + rename), so a crash never leaves half a file."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, p)
    return p


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate an xrwatch checkpoint; raises :class:`ModelError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds
        raise ModelError(f"{p}: not a readable torch checkpoint ({exc})") from exc
    validate_checkpoint(ckpt, source=str(p))
    return ckpt


def validate_checkpoint(ckpt: Any, *, source: str = "checkpoint") -> None:
    """Raise :class:`ModelError` unless ``ckpt`` follows the documented format."""
    from .models import ARCHITECTURES

    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelError(
            f"{source}: not an xrwatch checkpoint (expected format {FORMAT!r}, found {found!r})"
        )
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{source}: checkpoint format_version {ckpt.get('format_version')!r} is not "
            f"supported (this xrwatch reads version {FORMAT_VERSION})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ModelError(f"{source}: checkpoint lacks key(s) {missing}")
    if ckpt["arch"] not in ARCHITECTURES:
        raise ModelError(
            f"{source}: unknown architecture {ckpt['arch']!r}; expected one of {ARCHITECTURES}"
        )
    classes = ckpt["classes"]
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) for c in classes)
    ):
        raise ModelError(f"{source}: 'classes' must be a list of at least two names")
    if ckpt["task"] not in ("multiclass", "binary"):
        raise ModelError(f"{source}: unknown task {ckpt['task']!r}")
    if not isinstance(ckpt["model"], dict) or not ckpt["model"]:
        raise ModelError(f"{source}: 'model' must be a non-empty state_dict")
    try:
        PreprocessSpec.from_dict(ckpt["preprocess"])
    except Exception as exc:
        raise ModelError(f"{source}: invalid preprocessing spec: {exc}") from exc
