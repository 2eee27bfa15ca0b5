"""Cross-entropy and multi-class focal loss (Lin et al. 2017).

Focal loss: ``FL = -α_t (1 - p_t)^γ log p_t`` averaged over the batch, where ``p_t`` is the
softmax probability of the true class. γ = 0 without α is exactly cross-entropy; γ > 0
down-weights easy, confidently classified examples, so the rare classes' hard examples
count for more. α (optional, one weight per class) re-weights classes like CE's ``weight``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xrwatch.errors import ConfigError

logger = logging.getLogger(__name__)


class FocalLoss(nn.Module):
    """Multi-class focal loss on logits; see the module docstring."""

    alpha: torch.Tensor | None

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"focal loss gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        if alpha is not None:
            self.register_buffer("alpha", torch.tensor(list(alpha), dtype=torch.float32))
        else:
            self.alpha = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        log_pt = log_p.gather(1, target[:, None]).squeeze(1)
        pt = log_pt.exp()
        loss = -((1.0 - pt) ** self.gamma) * log_pt
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss.mean()


def build_loss(
    name: str, num_classes: int, *, gamma: float = 2.0, alpha: Sequence[float] | None = None
) -> nn.Module:
    """``ce`` or ``focal``; α must have one entry per class."""
    if alpha is not None and len(alpha) != num_classes:
        raise ConfigError(
            f"focal_alpha needs {num_classes} entries (one per class), got {len(alpha)}"
        )
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "focal":
        return FocalLoss(gamma, alpha)
    raise ConfigError(f"Invalid loss {name!r}. Only ce and focal are supported.")
