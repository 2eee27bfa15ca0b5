"""Small, metadata-complete xrwatch models for tests, built through the real export code.

``make_checkpoint`` writes a checkpoint in the documented format (random weights, seeded);
``make_tiny_onnx`` exports a tinycnn one through :func:`export.pipeline.export_model`, so the
result is exactly what ``xrwatch export`` produces (verified, all metadata). Needs the
``train`` extra; takes about two seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_CLASSES = ("Normal", "Bacteria", "Virus", "COVID-19")


def make_checkpoint(
    path: Path,
    *,
    arch: str = "tinycnn",
    classes: Sequence[str] = DEFAULT_CLASSES,
    size: int = 32,
    val_balanced_accuracy: float = 0.5,
    experiment: str = "custom",
    seed: int = 0,
    epoch: int = 1,
    val_loss: float | None = None,
    data: str = "synthetic-test-data",
    split_seed: int = 0,
) -> Path:
    """Write a checkpoint with seeded random weights to ``path`` and return it (``seed``
    seeds the weights; ``data`` and ``split_seed`` are the config's data and split seed)."""
    import torch

    from xrwatch.preprocess import PreprocessSpec
    from xrwatch_training.checkpoint import make_checkpoint as assemble
    from xrwatch_training.checkpoint import save_checkpoint
    from xrwatch_training.models import build_model
    from xrwatch_training.presets import TrainConfig

    torch.manual_seed(seed)
    backbone = build_model(arch, len(classes))
    _randomise_batchnorm(backbone, seed)
    metrics: dict[str, Any] = {
        "val": {
            "accuracy": val_balanced_accuracy,
            "balanced_accuracy": val_balanced_accuracy,
            "macro_f1": val_balanced_accuracy,
            "loss": val_loss,
        },
        "test": None,
        "train": {"accuracy": 0.9},
    }
    task = "multiclass" if len(classes) > 2 else "binary"
    config = TrainConfig(  # the complete config, as a training run writes it
        data=data, task=task, arch=arch,  # type: ignore[arg-type]
        weights="none", experiment=experiment, image_size=size, seed=split_seed,
        epochs=max(epoch, 1),
    )  # fmt: skip
    ckpt = assemble(
        arch=arch,
        classes=list(classes),
        task=task,
        experiment=experiment,
        preprocess=PreprocessSpec(size=size),
        config=config.to_dict(),
        model_state=backbone.state_dict(),
        optimizer_state=None,
        scheduler_state=None,
        scaler_state=None,
        epoch=epoch,
        metrics=metrics,
        best_val_balanced_accuracy=val_balanced_accuracy,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(ckpt, path)


def _randomise_batchnorm(model: Any, seed: int) -> None:
    """Give BatchNorm non-trivial statistics, so that BN folding is actually exercised."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def make_tiny_onnx(
    out_path: Path, classes: Sequence[str] = DEFAULT_CLASSES, size: int = 32, seed: int = 0
) -> Path:
    """Export a random-weight tinycnn for ``classes`` at ``size`` px to ``out_path``."""
    from xrwatch_export.pipeline import ExportOptions, export_model

    out_path = Path(out_path)
    ckpt = make_checkpoint(
        out_path.parent / f".{out_path.stem}-checkpoint" / "best.pt",
        classes=classes,
        size=size,
        seed=seed,
    )
    export_model(ExportOptions(source=ckpt, output=out_path, card=False))
    return out_path


def train_and_export(root: Path, images: Path, *, size: int = 64, epochs: int = 4) -> Path:
    """Train a tinycnn briefly on the real images under ``images`` (a folder per class) and
    export it with everything fitted on the run's splits (temperature, scope guard, cam).

    Returns the run folder; the model is ``RUN/model.onnx``. Tens of seconds on a CPU.
    """
    from xrwatch_export.pipeline import ExportOptions, export_model
    from xrwatch_training.engine import train
    from xrwatch_training.presets import TrainConfig

    cfg = TrainConfig(  # a real (tiny) training run, so the run folder has its splits
        data=str(images), arch="tinycnn", weights="none", split="patient", val_fraction=0.25,
        test_fraction=0.2, epochs=epochs, image_size=size, batch_size=16, lr=3e-3,
        out=str(root), name="run", workers=1, device="cpu", seed=0,
    )  # fmt: skip
    run = train(cfg)
    export_model(ExportOptions(source=run, output=run / "model.onnx", card=True))
    return run
