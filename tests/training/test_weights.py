"""Pretrained weights: a CheXNet-format checkpoint written here loads exactly; ImageNet
comes from the torch hub cache (or --imagenet-weights) with a clear error offline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from xrwatch.errors import ConfigError, ModelError
from xrwatch_training.models import build_model
from xrwatch_training.weights import imagenet_cache_path, load_chexnet, load_imagenet


def write_chexnet_checkpoint(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file in CheXNet's format; returns its feature tensors under today's names."""
    torch.manual_seed(seed)
    net = tvm.densenet121(weights=None)
    net.classifier = nn.Sequential(nn.Linear(1024, 14), nn.Sigmoid())
    for m in net.modules():  # non-default running stats, so a skipped buffer would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    state = net.state_dict()
    legacy = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # torch 0.3 checkpoints have none
        old = re.sub(r"(denselayer\d+)\.(norm|relu|conv)(\d)\.", r"\1.\2.\3.", key)
        legacy["module.densenet121." + old] = value.clone()
    assert (
        any(".norm.1." in k for k in legacy) and "module.densenet121.classifier.0.weight" in legacy
    )
    torch.save({"epoch": 1, "state_dict": legacy, "best_loss": 0.1}, path)
    return {k: v for k, v in state.items() if k.startswith("features.")}


def test_chexnet_checkpoint_loads_exactly(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pth.tar"
    features = write_chexnet_checkpoint(ckpt)
    model = build_model("densenet121", 4)
    head_before = model.classifier.weight.clone()
    load_chexnet(model, "densenet121", str(ckpt))
    state = model.state_dict()
    for key, value in features.items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(state[key], value, msg=key)
    assert model.classifier.weight.shape == (4, 1024)
    torch.testing.assert_close(model.classifier.weight, head_before)  # head stays fresh


def test_chexnet_refuses_partial_load(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pth.tar"
    write_chexnet_checkpoint(ckpt)
    data = torch.load(ckpt, weights_only=True)
    dropped = next(k for k in data["state_dict"] if "denseblock4" in k)
    del data["state_dict"][dropped]
    torch.save(data, ckpt)
    with pytest.raises(ModelError, match="refusing partially loaded"):
        load_chexnet(build_model("densenet121", 4), "densenet121", str(ckpt))
    with pytest.raises(ConfigError, match="--chexnet-weights"):
        load_chexnet(build_model("densenet121", 4), "densenet121", None)
    with pytest.raises(ConfigError, match="not found"):
        load_chexnet(build_model("densenet121", 4), "densenet121", str(tmp_path / "nope.tar"))


def test_imagenet_from_torch_home_and_offline_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = imagenet_cache_path("resnet50")
    assert target == tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError, match=r"resnet50-0676ba61\.pth.*--imagenet-weights"):
        load_imagenet(build_model("resnet50", 3), "resnet50")

    torch.manual_seed(1)
    reference = tvm.resnet50(weights=None)  # stands in for the real ImageNet file
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), target)
    model = build_model("resnet50", 3)
    load_imagenet(model, "resnet50")
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 3

    explicit = tmp_path / "mine.pth"
    torch.save({"state_dict": reference.state_dict()}, explicit)
    other = build_model("resnet50", 3)
    load_imagenet(other, "resnet50", str(explicit))
    torch.testing.assert_close(other.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
