"""The study's architectures with new classification heads.

``resnet50`` and ``densenet121`` are the study's. ``mobilenet_v3_small`` (the packaged
default's, ``benchmarks/paediatric_default.py``) and ``resnet18`` have a 7 x 7 last feature
map at 224 px, so their heatmaps localise; both end in global average pooling and one
linear layer (MobileNetV3's hidden classifier layer is dropped), so CAM is exact. On 2
shared CPU cores MobileNetV3-Small trains about 6x faster than ResNet18. ``tinycnn`` is a
small network for tests, demos and benchmarks of the plumbing (seconds to train on a
CPU), and the CPU-only baseline that ``benchmarks/real_subset.py`` trains on real X-rays
beside them (not the study's).
Pretrained weights are loaded by :mod:`training.weights`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

logger = logging.getLogger(__name__)

ARCHITECTURES = ("resnet50", "densenet121", "resnet18", "mobilenet_v3_small", "tinycnn")


class TinyCNN(nn.Module):
    """Four conv blocks and a linear head; for tests and demos only."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        chans = [3, 16, 32, 64, 96]
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(chans):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build_model(arch: str, num_classes: int) -> nn.Module:
    """An untrained ``arch`` with a ``num_classes`` head; takes N x 3 x H x W normalised input."""
    if arch == "resnet50":
        model = tvm.resnet50(weights=None)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    if arch == "resnet18":
        model = tvm.resnet18(weights=None)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    if arch == "mobilenet_v3_small":
        model = tvm.mobilenet_v3_small(weights=None)
        # global average pooling + one linear layer, so that CAM is exact
        model.classifier = nn.Linear(model.classifier[0].in_features, num_classes)
        # torchvision's BatchNorm momentum 0.01 suits ImageNet-length runs; at ~100 steps an
        # epoch the running statistics would lag the weights for epochs and evaluation would
        # see other activations than training (one class for every image). torch's default:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        return model
    if arch == "densenet121":
        model = tvm.densenet121(weights=None)
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
        return model
    if arch == "tinycnn":
        return TinyCNN(num_classes)
    raise ValueError(
        f"Invalid architecture {arch!r}. Only {', '.join(ARCHITECTURES)} are supported."
    )


def head_parameter_names(arch: str) -> tuple[str, ...]:
    """Names of the classification head's parameters (replaced when loading pretrained weights)."""
    return {
        "resnet50": ("fc.weight", "fc.bias"),
        "densenet121": ("classifier.weight", "classifier.bias"),
        "resnet18": ("fc.weight", "fc.bias"),
        "mobilenet_v3_small": ("classifier.weight", "classifier.bias"),
        "tinycnn": ("fc.weight", "fc.bias"),
    }[arch]


class NormalizedClassifier(nn.Module):
    """``backbone`` behind the preprocessing that lives inside the model.

    Takes N x 1 x H x W in [0, 1] (the output of ``PreprocessSpec.apply``), replicates the
    channel to three, normalises with ``mean``/``std`` and returns the backbone's logits.
    Export traces exactly this module, so ONNX carries the same normalisation.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        # Buffers, not parameters: they travel with .to(device) and into the ONNX graph as
        # constants, but are not in the checkpoint's ``model`` (the backbone's state_dict).
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1)  # 1 -> 3 channels without a copy
        return self.backbone((x - self.mean) / self.std)


def wrap(backbone: nn.Module, preprocess: dict[str, Any]) -> NormalizedClassifier:
    """Wrap ``backbone`` with the channel replication and normalisation of ``preprocess``."""
    return NormalizedClassifier(backbone, preprocess["mean"], preprocess["std"])


def population_classes(ckpt: dict[str, Any]) -> list[str]:
    """The extra output units of a checkpoint with a population gate (``["Adult"]``), after
    its diagnostic ``classes``; ``[]`` for a plain classifier (every older checkpoint)."""
    population = ckpt.get("population") or {}
    return list(population.get("classes") or [])


def output_units(ckpt: dict[str, Any]) -> int:
    """Units of the checkpoint's head: its classes, then its population classes."""
    return len(ckpt["classes"]) + len(population_classes(ckpt))


def model_from_checkpoint(ckpt: dict[str, Any]) -> NormalizedClassifier:
    """The eval-mode model of a checkpoint (see :func:`training.checkpoint.load_checkpoint`).

    Input N x 1 x H x W float32 in [0, 1] (``H = W = ckpt["preprocess"]["size"]``); output
    logits N x :func:`output_units` (the classes, then any population classes). Weights are
    loaded strictly: a mismatch is an error.
    """
    from xrwatch.errors import ModelError

    backbone = build_model(ckpt["arch"], output_units(ckpt))
    try:
        backbone.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"checkpoint weights do not fit {ckpt['arch']} with {output_units(ckpt)} outputs: {exc}"
        ) from exc
    model = wrap(backbone, ckpt["preprocess"])
    model.eval()
    return model
