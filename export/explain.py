"""The module that is exported: class scores plus heatmaps, calibration and the scope guard.

:class:`ExplainedClassifier` splits a checkpoint's model at its last feature map ``F``
(N x K x h x w, after the last ReLU) and global-average-pooled head ``W``, ``b``, and returns

* ``logits`` = ``W · mean_xy(F) + b`` (identical to the checkpoint's model),
* ``probabilities`` = ``softmax(logits / T)``, ``T`` the temperature fitted on validation
  (1 when not calibrated; argmax is unchanged by any ``T > 0``),
* ``cam`` (N x C x h x w) = ``Σ_k W[c, k] F[k]``: class activation mapping (Zhou et al.
  2016) for every class; for a network with global average pooling and one linear layer it
  equals Grad-CAM before its ReLU, up to the factor ``h·w``,
* with a guard, ``ood_score`` (N, > 1 = out of scope) and ``contrast`` (N): the standard
  deviation of the input image (a blank or constant image has ~0). ``ood_score`` is
  ``feature_score``, the Mahalanobis distance of ``mean_xy(F)`` to the training images'
  pooled features divided by the threshold chosen on validation; with a layout check it is
  the smaller of that and ``layout_score`` (both also outputs), so an image is out of scope
  only when both say so:
* ``layout_score`` (N): how far the image's coarse layout - the input averaged to a
  ``grid`` x ``grid`` thumbnail, standardised to mean 0 and standard deviation 1 - lies
  from the training thumbnails under a probabilistic PCA model of them (Tipping & Bishop
  1999: mean, first principal components with their variances, isotropic noise for the
  rest; the square root of its Mahalanobis form), divided by its own validation threshold.
  A frontal chest radiograph from another hospital, whose processing moves the network's
  features, keeps the layout of one (lungs, mediastinum, shoulders); a photograph, a
  micrograph, a text page or noise has neither.

The statistics are buffers, so they become constants of the ONNX graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from xrwatch.engine import (
    CAM,
    GUARD_OUTPUTS,
    LAYOUT_OUTPUTS,
    LOGITS,
    POPULATION,
    PROBABILITIES,
)
from xrwatch_training.models import NormalizedClassifier, TinyCNN

logger = logging.getLogger(__name__)

OUTPUTS = (LOGITS, PROBABILITIES, CAM)  # the names serving reads (xrwatch.engine)
LAYOUT_GRID = 8  # thumbnail side: 8 x 8 block means of the model input
LAYOUT_COMPONENTS = 8  # principal components of the training thumbnails kept
GUARD_COMBINE = ("both", "either")  # how the feature and layout checks combine
LAYOUT_EPS = 1e-3  # added to a thumbnail's standard deviation (a flat one stays finite)


def split_backbone(model: NormalizedClassifier) -> tuple[nn.Module, nn.Linear, str]:
    """``(features, head, name)``: the module producing the last feature map (non-negative,
    after the last ReLU), the linear head applied to its spatial mean, and a name for it."""
    from torchvision.models import DenseNet, MobileNetV3, ResNet

    b = model.backbone
    if isinstance(b, ResNet):
        trunk = nn.Sequential(
            b.conv1, b.bn1, b.relu, b.maxpool, b.layer1, b.layer2, b.layer3, b.layer4
        )
        return trunk, b.fc, "layer4"
    if isinstance(b, MobileNetV3):
        if not isinstance(b.classifier, nn.Linear):
            raise ValueError("CAM needs MobileNetV3 with a single linear classifier")
        return b.features, b.classifier, "features"
    if isinstance(b, DenseNet):
        # torchvision applies F.relu after ``features`` in forward(); make it a module
        return nn.Sequential(b.features, nn.ReLU()), b.classifier, "features.norm5+relu"
    if isinstance(b, TinyCNN):
        return b.features, b.fc, "features"
    raise ValueError(f"no class activation mapping for {type(b).__name__}")


class FeatureNet(nn.Module):
    """The checkpoint's model, split: ``image -> (pooled features, logits, feature map)``.

    With ``n_classes`` smaller than the head's units (a checkpoint with a population gate,
    :func:`training.models.population_classes`), ``head`` holds the first ``n_classes``
    rows (the diagnoses: logits, CAM, calibration) and ``gate`` the rest (the population
    units, e.g. ``Adult``), applied to the same pooled features.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: NormalizedClassifier, n_classes: int | None = None) -> None:
        super().__init__()
        self.features, head, self.layer_name = split_backbone(model)
        units = head.out_features
        n = units if n_classes is None else n_classes
        if not 0 < n <= units:
            raise ValueError(f"{n} classes for a head of {units} units")
        self.head, self.gate = head, None
        if n < units:
            self.head = _rows(head, 0, n)
            self.gate = _rows(head, n, units)
        self.register_buffer("mean", model.mean.clone())
        self.register_buffer("std", model.std.clone())

    def all_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Every unit of the checkpoint's head: the classes, then any population units."""
        logits = self.head(pooled)
        return logits if self.gate is None else torch.cat([logits, self.gate(pooled)], dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (image.expand(-1, 3, -1, -1) - self.mean) / self.std
        fmap = self.features(x)
        pooled = fmap.mean(dim=(2, 3))
        return pooled, self.head(pooled), fmap


def _rows(head: nn.Linear, start: int, stop: int) -> nn.Linear:
    """A linear layer computing units ``start:stop`` of ``head``."""
    part = nn.Linear(head.in_features, stop - start, bias=head.bias is not None)
    with torch.no_grad():
        part.weight.copy_(head.weight[start:stop])
        if head.bias is not None:
            part.bias.copy_(head.bias[start:stop])
    return part


def population_probability(logits: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """P(population unit) under the softmax over every unit: the share of the gate's units
    (``Adult``) against the diagnoses', ``sigmoid(logsumexp(gate) - logsumexp(logits))``."""
    return torch.sigmoid(torch.logsumexp(gate, dim=1) - torch.logsumexp(logits, dim=1))


class LogitsOnly(nn.Module):
    """``FeatureNet`` returning only the logits (what Grad-CAM and verification call)."""

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)[1]


@dataclass(frozen=True)
class LayoutStats:
    """The coarse-layout part of the scope guard (see the module docstring)."""

    grid: int  # thumbnail side; the model input's side is a multiple of it
    pool: int  # model input side // grid: the block each thumbnail pixel averages
    mean: np.ndarray  # grid²: mean standardised training thumbnail
    basis: np.ndarray  # components x grid², orthonormal rows (principal directions)
    inv_std: np.ndarray  # components: 1 / standard deviation along each direction
    inv_noise_std: float  # 1 / standard deviation of the rest (per dimension)
    threshold: float  # raw distance that ``layout_score`` = 1 stands for

    def distance(self, arrays: np.ndarray) -> np.ndarray:
        """Raw layout distance of model inputs (N x 1 x S x S), as the graph computes it."""
        thumbs = thumbnails(arrays, self.grid)
        return layout_distance(thumbs, self.mean, self.basis, self.inv_std, self.inv_noise_std)


@dataclass(frozen=True)
class GuardStats:
    """Training statistics of the scope guard (see the module docstring)."""

    mean: np.ndarray  # K
    whitening: np.ndarray  # K x K, with whitening @ whitening.T = inverse covariance
    threshold: float  # raw Mahalanobis distance that ``feature_score`` = 1 stands for
    layout: LayoutStats | None = None
    # "both": out of scope only when features and layout both exceed 1 (ood_score = min);
    # "either": when either does (ood_score = max) - for a model whose population gate,
    # not the guard, handles chest films from other populations and hospitals
    combine: str = "both"


class ExplainedClassifier(nn.Module):
    """``image -> (logits, probabilities, cam[, ood_score, contrast])``; see the module doc."""

    temperature: torch.Tensor
    guard_mean: torch.Tensor
    guard_whitening: torch.Tensor
    guard_threshold: torch.Tensor
    layout_mean: torch.Tensor
    layout_basis: torch.Tensor
    layout_inv_std: torch.Tensor
    layout_inv_noise_std: torch.Tensor
    layout_threshold: torch.Tensor

    def __init__(
        self, net: FeatureNet, *, temperature: float = 1.0, guard: GuardStats | None = None
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.net = net
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.has_guard = guard is not None
        if guard is not None:
            self.register_buffer("guard_mean", torch.from_numpy(guard.mean.astype(np.float32)))
            self.register_buffer(
                "guard_whitening", torch.from_numpy(guard.whitening.astype(np.float32))
            )
            self.register_buffer("guard_threshold", torch.tensor(float(guard.threshold)))
        self.layout_pool = 0
        self.guard_either = guard is not None and guard.combine == "either"
        if guard is not None and guard.combine not in GUARD_COMBINE:
            raise ValueError(f"guard combine must be one of {GUARD_COMBINE}, got {guard.combine!r}")
        if guard is not None and guard.layout is not None:
            layout = guard.layout
            self.layout_pool = layout.pool
            self.register_buffer("layout_mean", torch.from_numpy(layout.mean.astype(np.float32)))
            self.register_buffer("layout_basis", torch.from_numpy(layout.basis.astype(np.float32)))
            self.register_buffer(
                "layout_inv_std", torch.from_numpy(layout.inv_std.astype(np.float32))
            )
            self.register_buffer("layout_inv_noise_std", torch.tensor(float(layout.inv_noise_std)))
            self.register_buffer("layout_threshold", torch.tensor(float(layout.threshold)))

    @property
    def output_names(self) -> tuple[str, ...]:
        population = (POPULATION,) if self.net.gate is not None else ()
        if not self.has_guard:
            return OUTPUTS + population
        return OUTPUTS + GUARD_OUTPUTS + (LAYOUT_OUTPUTS if self.layout_pool else ()) + population

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self._outputs(image)
        if self.net.gate is None:
            return out
        pooled = self.net(image)[0]
        return (*out, population_probability(out[0], self.net.gate(pooled)))

    def _outputs(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled, logits, fmap = self.net(image)
        probs = torch.softmax(logits / self.temperature, dim=1)
        cam = torch.einsum("ck,nkhw->nchw", self.net.head.weight, fmap)
        if not self.has_guard:
            return logits, probs, cam
        z = (pooled - self.guard_mean) @ self.guard_whitening
        feature = torch.sqrt((z * z).sum(dim=1)) / self.guard_threshold
        contrast = image.flatten(1).std(dim=1, unbiased=False)
        if not self.layout_pool:
            return logits, probs, cam, feature, contrast
        thumb = nn.functional.avg_pool2d(image, self.layout_pool).flatten(1)
        thumb = thumb - thumb.mean(dim=1, keepdim=True)
        thumb = thumb / (thumb.std(dim=1, unbiased=False, keepdim=True) + LAYOUT_EPS)
        d = thumb - self.layout_mean
        z = d @ self.layout_basis.T
        r = (d - z @ self.layout_basis) * self.layout_inv_noise_std
        z = z * self.layout_inv_std
        layout = torch.sqrt((z * z).sum(dim=1) + (r * r).sum(dim=1)) / self.layout_threshold
        ood = (
            torch.maximum(feature, layout) if self.guard_either else torch.minimum(feature, layout)
        )
        return logits, probs, cam, ood, contrast, feature, layout


class CalibratedLogits(nn.Module):
    """``logits / T`` of an :class:`ExplainedClassifier`: its softmax is ``probabilities``."""

    def __init__(self, explained: ExplainedClassifier) -> None:
        super().__init__()
        self.explained = explained

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        temperature: torch.Tensor = self.explained.temperature
        return self.explained.net(image)[1] / temperature


def run_feature_net(
    net: FeatureNet, arrays: np.ndarray, batch: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """``(pooled features N x K, logits N x C)`` of preprocessed inputs (N x 1 x S x S)."""
    pooled, logits = [], []
    net.eval()
    with torch.no_grad():
        for start in range(0, len(arrays), batch):
            p, lg, _ = net(torch.from_numpy(np.ascontiguousarray(arrays[start : start + batch])))
            pooled.append(p.double().numpy())
            logits.append(lg.double().numpy())
    return np.concatenate(pooled), np.concatenate(logits)


def fit_guard(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, whitening)`` of the training features, covariance shrunk by Ledoit-Wolf
    (there are usually fewer images than feature dimensions)."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(train_features)
    precision = lw.precision_
    precision = (precision + precision.T) / 2
    whitening = np.linalg.cholesky(precision)  # precision = L L^T, so ||d L||² = d P d^T
    return lw.location_, whitening


def mahalanobis(features: np.ndarray, mean: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    z = (features - mean) @ whitening
    return np.sqrt((z * z).sum(axis=1))


def thumbnails(arrays: np.ndarray, grid: int) -> np.ndarray:
    """Model inputs (N x 1 x S x S, S a multiple of ``grid``) -> standardised ``grid`` x
    ``grid`` block means, N x grid² (what the graph computes for ``layout_score``)."""
    n, size = len(arrays), arrays.shape[-1]
    f = size // grid
    x = np.asarray(arrays, np.float64).reshape(n, grid, f, grid, f).mean(axis=(2, 4))
    x = x.reshape(n, -1)
    x = x - x.mean(axis=1, keepdims=True)
    return x / (x.std(axis=1, keepdims=True) + LAYOUT_EPS)


def fit_layout(
    thumbs: np.ndarray, components: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(mean, basis, inv_std, inv_noise_std)`` of a probabilistic PCA of the training
    thumbnails: their mean, first principal directions, 1 / the standard deviation along
    each, and 1 / the standard deviation of the remaining variance per dimension."""
    n, dims = thumbs.shape
    mean = thumbs.mean(axis=0)
    _, sing, vt = np.linalg.svd(thumbs - mean, full_matrices=False)
    k = min(components, len(vt) - 1)
    variance = sing**2 / max(n - 1, 1)
    noise = float(variance[k:].sum()) / (dims - k)
    floor = 1e-12 + 1e-6 * float(variance[0])
    return (
        mean,
        vt[:k],
        1.0 / np.sqrt(np.maximum(variance[:k], floor)),
        1.0 / np.sqrt(max(noise, floor)),
    )


def layout_distance(
    thumbs: np.ndarray,
    mean: np.ndarray,
    basis: np.ndarray,
    inv_std: np.ndarray,
    inv_noise_std: float,
) -> np.ndarray:
    """Probabilistic-PCA distance of each thumbnail (what ``layout_score`` is, unscaled)."""
    d = thumbs - mean
    z = d @ basis.T
    r = (d - z @ basis) * inv_noise_std
    z = z * inv_std
    return np.sqrt((z * z).sum(axis=1) + (r * r).sum(axis=1))


def guard_passes(
    scores: np.ndarray, contrast: np.ndarray, min_contrast: float, combine: str = "both"
) -> np.ndarray:
    """Which images pass the guard as the exported graph decides it: ``scores`` (one row per
    score - feature distance, layout distance - each divided by its threshold) has a row at
    or below 1 (``combine`` "both": flagged only when all exceed) or every row at or below 1
    ("either": flagged when any exceeds), and the image's ``contrast`` is at least
    ``min_contrast``."""
    worst = np.max(scores, axis=0) if combine == "either" else np.min(scores, axis=0)
    return (worst <= 1.0) & (contrast >= min_contrast)


def pass_threshold(distances: np.ndarray, pass_rate: float) -> float:
    """The distance at or below which at least ``pass_rate`` of ``distances`` lie."""
    if len(distances) == 0:
        raise ValueError("no validation images to choose the guard threshold on")
    k = int(np.ceil(pass_rate * len(distances))) - 1
    return float(np.sort(distances)[min(max(k, 0), len(distances) - 1)]) * (1 + 1e-6)
