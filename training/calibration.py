"""Temperature scaling and the expected calibration error (ECE), after Guo et al. 2017.

``fit_temperature`` finds the ``T`` minimising the negative log-likelihood of
``softmax(logits / T)`` on held-out (validation) logits. Dividing every logit of a row by
the same positive ``T`` keeps their order, so the top-1 class never changes; only the
confidence does. ``expected_calibration_error`` is the usual top-label ECE: confidences
binned into ``bins`` equal-width bins of [0, 1], the bin-size-weighted mean of
``|accuracy - mean confidence|`` per bin. ``ece_intervals`` says how sure those figures
are: bootstrap percentile intervals of ECE before, after, and of the paired change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ECE_BINS = 15  # Guo et al. 2017; netcal's default is 10, so tests pass bins=15 explicitly
T_MIN, T_MAX = 0.05, 20.0  # search range of the temperature
BOOTSTRAP_RESAMPLES = 1000  # resamples drawn by ece_intervals
BOOTSTRAP_SEED = 0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Top-label ECE of ``probs`` (N x C) against integer ``labels`` (N)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if len(probs) == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes to the first bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def ece_entry(
    before: np.ndarray, after: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> dict[str, Any]:
    """The metadata's ECE of one split: ``before`` and ``after`` temperature scaling, and
    ``n``, the images measured."""
    return {
        "before": expected_calibration_error(before, labels, bins),
        "after": expected_calibration_error(after, labels, bins),
        "n": len(labels),
    }


def paired_intervals(
    before: np.ndarray,
    after: np.ndarray,
    labels: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, list[float]]:
    """95 % bootstrap percentile intervals of ``statistic(probs, labels)`` for ``before`` and
    for ``after`` (N x C probabilities of the same N labelled images, e.g. without and with
    temperature) and of the paired change ``after - before``: each resample draws N images
    with replacement and scores both on the same draw. Keys ``before``, ``after``,
    ``change``: ``[low, high]``."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0 or before.shape != after.shape or len(before) != n:
        raise ValueError(
            f"need N x C probabilities before and after for N labels, got "
            f"{before.shape}, {after.shape} and {labels.shape}"
        )
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, 2))
    for r in range(resamples):
        idx = rng.integers(0, n, n)
        draws[r] = statistic(before[idx], labels[idx]), statistic(after[idx], labels[idx])

    def interval(values: np.ndarray) -> list[float]:
        low, high = np.percentile(values, [2.5, 97.5])
        return [float(low), float(high)]

    return {
        "before": interval(draws[:, 0]),
        "after": interval(draws[:, 1]),
        "change": interval(draws[:, 1] - draws[:, 0]),
    }


def ece_intervals(
    before: np.ndarray,
    after: np.ndarray,
    labels: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    bins: int = ECE_BINS,
) -> dict[str, list[float]]:
    """:func:`paired_intervals` of the ECE.

    On a few hundred images the ECE of one sample is noisy; a change whose interval holds
    0 is one this many images cannot tell from chance. Resampled ECE sits above the
    sample's own (duplicated images make the bins noisier), so the ``before`` and ``after``
    intervals run high; the interval of the paired ``change`` is the one to read.
    """
    return paired_intervals(
        before,
        after,
        labels,
        lambda probs, y: expected_calibration_error(probs, y, bins),
        resamples=resamples,
        seed=seed,
    )


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (probabilities clipped at 1e-12)."""
    p = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return nll(softmax(logits, temperature), labels)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising validation NLL (golden-section search on log T)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on an empty validation split")
    lo, hi = np.log(T_MIN), np.log(T_MAX)
    # coarse grid first (the NLL in log T is unimodal in practice, but be safe), then refine
    grid = np.linspace(lo, hi, 81)
    values = [_nll(logits, labels, float(np.exp(g))) for g in grid]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if _nll(logits, labels, float(np.exp(c))) <= _nll(logits, labels, float(np.exp(d))):
            b = d
        else:
            a = c
    return float(np.exp((a + b) / 2))


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: mean confidence, accuracy (NaN when empty) and count."""
    confidence = np.asarray(probs).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    conf = np.full(bins, np.nan)
    acc = np.full(bins, np.nan)
    count = np.zeros(bins, dtype=int)
    for b in range(bins):
        mask = which == b
        count[b] = int(mask.sum())
        if count[b]:
            conf[b], acc[b] = confidence[mask].mean(), correct[mask].mean()
    return conf, acc, count


def plot_reliability(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str
) -> Path:
    """Reliability diagram: one panel per ``name -> (probs, labels)``, ECE in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(curves), figsize=(4.2 * len(curves), 4.2), constrained_layout=True, squeeze=False
    )
    centers = (np.arange(ECE_BINS) + 0.5) / ECE_BINS
    for ax, (name, (probs, labels)) in zip(axes[0], curves.items(), strict=True):
        _, acc, count = reliability_bins(probs, labels)
        ece = expected_calibration_error(probs, labels)
        ax.bar(centers, np.nan_to_num(acc), width=1 / ECE_BINS, edgecolor="black",
               alpha=0.7, label=f"accuracy (ECE {ece:.3f}, n={len(labels)})")  # fmt: skip
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        for x, n in zip(centers, count, strict=True):
            if n:
                ax.text(x, 0.02, str(n), ha="center", fontsize=6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 confidence")
        ax.set_ylabel("top-1 accuracy")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("wrote reliability diagram %s", path)
    return path
