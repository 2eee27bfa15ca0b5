"""The study's architectures with new classification heads.

``resnet50`` and ``densenet121`` are the study's; ``tinycnn`` is a small network for tests,
demos and benchmarks of the plumbing (seconds to train on a CPU), never for results.
Pretrained weights are loaded by :mod:`training.weights`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

ARCHITECTURES = ("resnet50", "densenet121", "tinycnn")


class TinyCNN(nn.Module):
    """Four conv blocks and a linear head; for tests and demos only."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        chans = [3, 16, 32, 64, 96]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:], strict=False):
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
    if arch == "densenet121":
        model = tvm.densenet121(weights=None)
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
        return model
    if arch == "tinycnn":
        return TinyCNN(num_classes)
    raise ValueError(f"Invalid architecture {arch!r}. Only {', '.join(ARCHITECTURES)} are supported.")


def head_parameter_names(arch: str) -> tuple[str, ...]:
    """Names of the classification head's parameters (replaced when loading pretrained weights)."""
    return {
        "resnet50": ("fc.weight", "fc.bias"),
        "densenet121": ("classifier.weight", "classifier.bias"),
        "tinycnn": ("fc.weight", "fc.bias"),
    }[arch]
