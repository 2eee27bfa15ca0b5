"""The checkpoint format export builds on: write, validate, rebuild the wrapped model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xrwatch.errors import ModelError
from xrwatch.preprocess import PreprocessSpec
from xrwatch_training.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from xrwatch_training.models import NormalizedClassifier, build_model, model_from_checkpoint


def _ckpt(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = build_model("tinycnn", 3)
    spec = PreprocessSpec(size=32)
    ckpt = make_checkpoint(
        arch="tinycnn",
        classes=["A", "B", "C"],
        task="multiclass",
        experiment="custom",
        preprocess=spec,
        config={"arch": "tinycnn"},
        model_state=backbone.state_dict(),
        optimizer_state=None,
        scheduler_state=None,
        scaler_state=None,
        epoch=1,
        metrics={"val": {"accuracy": 0.5}, "test": None, "train": {}},
        best_val_balanced_accuracy=0.5,
    )
    return save_checkpoint(ckpt, tmp_path / "best.pt"), backbone


def test_roundtrip_rebuilds_the_same_function(tmp_path: Path) -> None:
    path, backbone = _ckpt(tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt["classes"] == ["A", "B", "C"]
    model = model_from_checkpoint(ckpt)
    assert isinstance(model, NormalizedClassifier) and not model.training
    x = torch.rand(2, 1, 32, 32)
    backbone.eval()
    mean = torch.tensor(PreprocessSpec().mean).view(1, 3, 1, 1)
    std = torch.tensor(PreprocessSpec().std).view(1, 3, 1, 1)
    expected = backbone((x.repeat(1, 3, 1, 1) - mean) / std)
    torch.testing.assert_close(model(x), expected)
    assert set(ckpt["model"]) == set(build_model("tinycnn", 3).state_dict())


def test_refuses_foreign_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ModelError, match="not an xrwatch checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelError, match=r"junk\.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_refuses_mismatched_weights(tmp_path: Path) -> None:
    path, _ = _ckpt(tmp_path)
    ckpt = load_checkpoint(path)
    ckpt["classes"] = ["A", "B"]
    with pytest.raises(ModelError, match="do not fit"):
        model_from_checkpoint(ckpt)
