"""Augmentation for what a PACS, a workstation or a re-export does to the pixels of a film.

The shipped default must not read its diagnosis from global contrast, a black border or
compression (issue #20: a 2 % autocontrast flipped 16 of 17 Bacteria to Virus; a 10 %
black border turned 49 of 49 children into COVID-19). :func:`pacs_augment` draws, per
image of a batch N x 1 x H x W in [0, 1], each with its own probability:

* geometry: horizontal flip, rotation, zoom in or out with a shift and a slight aspect
  change (a crop, or a smaller film on a black field);
* black borders (collimation, letterboxing): up to ``border_max`` of the side, per side;
* intensity: gamma, linear contrast/brightness, an autocontrast-like window stretch (a
  random 0-3 % of pixels clipped at each end), histogram equalisation;
* JPEG re-encoding at a random quality (Pillow), as an export to JPEG would.

All draws come from the caller's ``torch.Generator`` (seeded per epoch by the loop), so a
resumed run sees the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PacsAugment:
    """Probabilities and ranges of :func:`pacs_augment` (the default recipe's values)."""

    hflip: float = 0.5
    rotation_p: float = 0.3
    rotation_degrees: float = 10.0
    zoom_p: float = 0.5
    zoom: tuple[float, float] = (0.85, 1.2)  # > 1 zooms in (a crop), < 1 out (black field)
    shift: float = 0.06  # of the side
    aspect: float = 0.1  # horizontal scale differs from vertical by up to this
    border_p: float = 0.3
    border_max: float = 0.15  # of the side, per side
    gamma_p: float = 0.5
    gamma: float = 0.4  # exponent exp(U(-g, g))
    contrast_p: float = 0.5
    contrast: tuple[float, float] = (0.7, 1.3)
    brightness: float = 0.1
    stretch_p: float = 0.3
    stretch_max: float = 0.03  # fraction clipped at each end
    equalize_p: float = 0.15
    jpeg_p: float = 0.2
    jpeg_quality: tuple[int, int] = (40, 95)


def _affine(x: torch.Tensor, cfg: PacsAugment, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    r = torch.rand(9, n, generator=g)
    angle = torch.where(
        r[0] < cfg.rotation_p,
        (r[1] * 2 - 1) * math.radians(cfg.rotation_degrees),
        torch.zeros(n),
    )
    zoomed = r[2] < cfg.zoom_p
    lo, hi = cfg.zoom
    scale = torch.where(zoomed, lo + (hi - lo) * r[3], torch.ones(n))
    aspect = torch.where(zoomed, 1 + (r[4] * 2 - 1) * cfg.aspect, torch.ones(n))
    tx = torch.where(zoomed, (r[5] * 2 - 1) * cfg.shift * 2, torch.zeros(n))
    ty = torch.where(zoomed, (r[6] * 2 - 1) * cfg.shift * 2, torch.zeros(n))
    flip = torch.where(r[7] < cfg.hflip, -torch.ones(n), torch.ones(n))
    moved = (angle != 0) | zoomed
    out = torch.where((flip < 0)[:, None, None, None], x.flip(3), x)
    if not bool(moved.any()):
        return out
    # output -> input sampling grid: a zoom by s samples 1/s of the field
    sx, sy = 1 / (scale * aspect), 1 / scale
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [torch.stack([cos * sx, -sin * sy, tx], 1), torch.stack([sin * sx, cos * sy, ty], 1)], 1
    )[moved]
    sub = out[moved]
    grid = F.affine_grid(theta.to(sub.dtype), list(sub.shape), align_corners=False)
    out = out.clone()
    out[moved] = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)  # fmt: skip
    return out


def _borders(x: torch.Tensor, cfg: PacsAugment, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    r = torch.rand(5, n, generator=g)
    chosen = r[0] < cfg.border_p
    if not bool(chosen.any()):
        return x
    x = x.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        top, bottom, left, right = (float(r[k + 1, i]) * cfg.border_max for k in range(4))
        x[i, :, : int(top * h)] = 0
        x[i, :, h - int(bottom * h) :] = 0
        x[i, :, :, : int(left * w)] = 0
        x[i, :, :, w - int(right * w) :] = 0
    return x


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each image (N x 1 x H x W in [0, 1]) over 256 levels."""
    n = x.shape[0]
    q = (x.clamp(0, 1) * 255).round().long().view(n, -1)
    hist = torch.zeros(n, 256, dtype=torch.float32)
    hist.scatter_add_(1, q, torch.ones_like(q, dtype=torch.float32))
    cdf = hist.cumsum(1)
    first = cdf.gather(1, (hist > 0).float().argmax(1, keepdim=True))
    lut = ((cdf - first) / (cdf[:, -1:] - first).clamp(min=1)).clamp(0, 1)
    return lut.gather(1, q).view_as(x)


def stretch(x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Window stretch of each image: its ``clip`` quantile to 0, its 1 - ``clip`` to 1."""
    n = x.shape[0]
    flat = x[..., ::2, ::2].reshape(n, -1).float()  # quantiles of a quarter of the pixels
    ordered = flat.sort(dim=1).values
    last = ordered.shape[1] - 1
    k = (clip.clamp(0, 0.5) * last).round().long()
    lo = ordered.gather(1, k[:, None]).squeeze(1)
    hi = ordered.gather(1, (last - k)[:, None]).squeeze(1)
    scale = (hi - lo).clamp(min=1e-3)
    return ((x - lo.view(n, 1, 1, 1)) / scale.view(n, 1, 1, 1)).clamp(0, 1)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` (H x W in [0, 1]) through an 8-bit JPEG at ``quality`` and back."""
    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(
        buf, format="JPEG", quality=int(quality)
    )
    buf.seek(0)
    return np.asarray(Image.open(buf), dtype=np.float32) / 255.0


def _intensity(x: torch.Tensor, cfg: PacsAugment, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    r = torch.rand(12, n, generator=g)
    view = (n, 1, 1, 1)
    gamma = torch.where(r[0] < cfg.gamma_p, torch.exp((r[1] * 2 - 1) * cfg.gamma), torch.ones(n))
    x = x.clamp(0, 1) ** gamma.view(view)
    lo, hi = cfg.contrast
    c = torch.where(r[2] < cfg.contrast_p, lo + (hi - lo) * r[3], torch.ones(n))
    b = torch.where(r[2] < cfg.contrast_p, (r[4] * 2 - 1) * cfg.brightness, torch.zeros(n))
    x = ((x - 0.5) * c.view(view) + 0.5 + b.view(view)).clamp(0, 1)
    chosen = r[5] < cfg.stretch_p
    if bool(chosen.any()):
        x = x.clone()
        x[chosen] = stretch(x[chosen], r[6][chosen] * cfg.stretch_max)
    chosen = r[7] < cfg.equalize_p
    if bool(chosen.any()):
        x = x.clone()
        x[chosen] = equalize(x[chosen])
    chosen = r[8] < cfg.jpeg_p
    if bool(chosen.any()):
        x = x.clone()
        qlo, qhi = cfg.jpeg_quality
        for i in torch.nonzero(chosen).flatten().tolist():
            quality = qlo + int(float(r[9, i]) * (qhi - qlo))
            x[i, 0] = torch.from_numpy(jpeg(x[i, 0].numpy(), quality))
    return x


def pacs_augment(x: torch.Tensor, cfg: PacsAugment, g: torch.Generator) -> torch.Tensor:
    """One augmented copy of the batch ``x`` (N x 1 x H x W float in [0, 1], on the CPU)."""
    x = _affine(x.float(), cfg, g)
    x = _borders(x, cfg, g)
    return _intensity(x, cfg, g).clamp(0, 1)
