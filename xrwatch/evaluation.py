"""Classification metrics with 95 % confidence intervals from a bootstrap over patients.

Torch-free and scikit-learn-free (numpy only), so ``xrwatch evaluate`` runs on a serving
install. The point estimates follow :mod:`training.metrics` (scikit-learn) exactly, and the
tests check them against scikit-learn:

* balanced accuracy = mean sensitivity over the classes present in ``y_true``;
* macro-F1 = mean F1 over the classes present in ``y_true``;
* per class: sensitivity (recall), PPV (precision), F1, one-vs-rest AUROC; a value that is
  undefined (no positive, never predicted) is ``None``, never 0;
* the confusion matrix, rows = true class, columns = predicted class.

Confidence intervals resample **patients**, not images: images of one patient are
correlated, so resampling images would pretend to more evidence than there is. Each
replicate draws as many patients as there are, with replacement, keeps all their images,
and recomputes every metric; the interval is the 2.5th-97.5th percentile over the
replicates where the metric is defined (``n_defined`` says how many that was). The draws
are exactly those of :func:`xrwatch.metrics_ci.bootstrap_replicates` (same seed, same
count), so accuracy, balanced accuracy and macro-F1 get the very intervals training
reports; this module adds per-class and AUROC intervals on the same resamples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from xrwatch.metrics_ci import N_BOOT, exact_if_degenerate

logger = logging.getLogger(__name__)

BOOTSTRAP_REPLICATES = N_BOOT  # as training's intervals (xrwatch.metrics_ci)
CI_LEVEL = 0.95
SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro")
PER_CLASS_KEYS = ("sensitivity", "ppv", "f1", "auroc")


def auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """One-vs-rest AUROC (Mann-Whitney U with tied scores averaged); None without both
    positives and negatives."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    # average ranks over ties: each run of equal scores gets the mean of its positions
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(score)]))
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of 1-based ranks s+1 .. e
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def point_metrics(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, Any]:
    """The metrics of one set of predictions, keyed by class index (see the module doc)."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)
    cm = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = np.where(present, tp / np.maximum(support, 1), np.nan)
        ppv = np.where(predicted > 0, tp / np.maximum(predicted, 1), np.nan)
        denom = support + predicted
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    aurocs = [auroc(y_true == i, probs[:, i]) for i in range(n_classes)]
    defined = [a for a in aurocs if a is not None]
    n = len(y_true)
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else None,
        "balanced_accuracy": float(np.mean(sens[present])) if present.any() else None,
        "macro_f1": float(np.mean(f1[present])) if present.any() else None,
        "auroc_macro": float(np.mean(defined)) if defined else None,
        "sensitivity": [None if np.isnan(v) else float(v) for v in sens],
        "ppv": [None if np.isnan(v) else float(v) for v in ppv],
        "f1": [float(f1[i]) if present[i] else None for i in range(n_classes)],
        "auroc": aurocs,
        "support": support.tolist(),
        "confusion_matrix": cm.tolist(),
    }


def _percentile_ci(values: list[float]) -> list[float] | None:
    if not values:
        return None
    tail = (1.0 - CI_LEVEL) / 2.0 * 100.0
    lo, hi = np.percentile(np.asarray(values), [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def evaluate_with_ci(
    y_true: Sequence[int],
    probs: np.ndarray,
    groups: Sequence[str],
    classes: Sequence[str],
    *,
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric with its 95 % CI from a bootstrap over ``groups`` (patients).

    Returns ``{"n_images", "n_patients", "bootstrap": {...}, "<summary key>": {"value",
    "ci", "n_defined"}, "per_class": {class: {"support", "<key>": {...}}},
    "confusion_matrix"}``. ``ci`` is None when the metric was defined in no replicate.
    """
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or p.shape != (len(y), len(classes)):
        raise ValueError(f"expected {len(y)} x {len(classes)} probabilities, got {p.shape}")
    if len(groups) != len(y):
        raise ValueError(f"expected {len(y)} patient groups, got {len(groups)}")
    if replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {replicates}")
    k = len(classes)
    point = point_metrics(y, p, k) if len(y) else None
    names, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    n_pat = len(names)
    # times each patient is drawn, per replicate: the draws of metrics_ci.bootstrap_replicates
    times: Any = (
        rng.multinomial(n_pat, np.full(n_pat, 1.0 / n_pat), size=replicates) if n_pat else []
    )
    draws: dict[str, list[float]] = {key: [] for key in SUMMARY_KEYS}
    class_draws: dict[tuple[str, int], list[float]] = {
        (key, i): [] for key in PER_CLASS_KEYS for i in range(k)
    }
    for counts in times:
        idx = np.repeat(np.arange(len(y)), counts[inverse])  # each image as often as its patient
        m = point_metrics(y[idx], p[idx], k)
        for key in SUMMARY_KEYS:
            if m[key] is not None:
                draws[key].append(m[key])
        for key in PER_CLASS_KEYS:
            for i in range(k):
                if m[key][i] is not None:
                    class_draws[(key, i)].append(m[key][i])

    def entry(
        value: float | None, values: list[float], trials: int | None = None
    ) -> dict[str, Any]:
        """``trials``: patients behind a proportion; its 0 or 1 gets the exact interval."""
        ci, method = _percentile_ci(values), "percentile bootstrap"
        if trials is not None:
            ci, method = exact_if_degenerate(value, trials, ci, CI_LEVEL)
        out: dict[str, Any] = {"value": value, "ci": ci, "n_defined": len(values)}
        if method != "percentile bootstrap":
            out["ci_method"] = method
        return out

    yp = np.argmax(p, axis=1) if len(y) else np.zeros(0, int)

    def patients(mask: np.ndarray) -> int:
        return len({inverse[j] for j in np.flatnonzero(mask)})

    # the patients behind each per-class proportion (sensitivity, PPV)
    trials: dict[str, list[int]] = {
        "sensitivity": [patients(y == i) for i in range(k)],
        "ppv": [patients(yp == i) for i in range(k)],
    }

    out: dict[str, Any] = {
        "n_images": len(y),
        "n_patients": len(names),
        "bootstrap": {
            "unit": "patient",
            "replicates": replicates,
            "seed": seed,
            "ci_level": CI_LEVEL,
            "method": "percentile",
        },
    }
    for key in SUMMARY_KEYS:
        n_trials = len(names) if key == "accuracy" else None
        out[key] = entry(point[key] if point else None, draws[key], n_trials)
    out["per_class"] = {
        name: {
            "support": int(point["support"][i]) if point else 0,
            "patients": len({inverse[j] for j in np.flatnonzero(y == i)}),
            **{
                key: entry(
                    point[key][i] if point else None,
                    class_draws[(key, i)],
                    trials[key][i] if key in trials else None,
                )
                for key in PER_CLASS_KEYS
            },
        }
        for i, name in enumerate(classes)
    }
    out["confusion_matrix"] = point["confusion_matrix"] if point else [[0] * k] * k
    return out


# -- the low_confidence rule: which share of wrong and right predictions a threshold flags --

# Thresholds the risk-coverage table shows: flag a result whose top probability is below.
RISK_COVERAGE_THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)


def flag_rates(correct: np.ndarray, confidence: np.ndarray, threshold: float) -> dict[str, Any]:
    """What flagging ``confidence < threshold`` does: the share flagged, the accuracy of
    what stays unflagged, and the shares of the wrong and of the right predictions flagged
    (None where there are none to share)."""
    ok = np.asarray(correct, dtype=bool)
    flagged = np.asarray(confidence, dtype=np.float64) < threshold
    n, n_wrong, n_right = len(ok), int((~ok).sum()), int(ok.sum())

    def share(part: int, whole: int) -> float | None:
        return part / whole if whole else None

    return {
        "threshold": float(threshold),
        "n": n,
        "flagged": int(flagged.sum()),
        "flagged_share": share(int(flagged.sum()), n),
        "accuracy_unflagged": share(int((ok & ~flagged).sum()), int((~flagged).sum())),
        "wrong_flagged": share(int((~ok & flagged).sum()), n_wrong),
        "right_flagged": share(int((ok & flagged).sum()), n_right),
        "n_wrong": n_wrong,
        "n_right": n_right,
    }


def risk_coverage(
    correct: np.ndarray,
    confidence: np.ndarray,
    thresholds: Sequence[float] = RISK_COVERAGE_THRESHOLDS,
) -> list[dict[str, Any]]:
    """:func:`flag_rates` at each threshold: how accuracy of the unflagged results rises as
    more are flagged (coverage = 1 - ``flagged_share``)."""
    return [flag_rates(correct, confidence, t) for t in thresholds]


def choose_low_confidence(
    correct: np.ndarray, confidence: np.ndarray, *, max_right_flagged: float = 0.2
) -> dict[str, Any]:
    """The threshold to store for ``low_confidence``, chosen on validation predictions: the
    highest top probability (of those seen, rounded down to 0.01) below which at most
    ``max_right_flagged`` of the right predictions fall - so as many wrong ones as possible
    are flagged while the right ones flagged stay within that share. Its rates on these
    predictions come with it (``flag_rates``); measure them again on held-out data."""
    ok = np.asarray(correct, dtype=bool)
    conf = np.asarray(confidence, dtype=np.float64)
    if not ok.any():
        raise ValueError("no right prediction to choose a threshold on")
    # flagging below t flags the right predictions with confidence < t; the largest t that
    # keeps their share within the budget is the next right confidence above the quantile
    right = np.sort(conf[ok])
    allowed = int(np.floor(max_right_flagged * len(right)))  # right ones that may fall below
    limit = right[allowed] if allowed < len(right) else 1.0
    threshold = float(np.floor(limit * 100) / 100)  # a round number, never above the limit
    return flag_rates(ok, conf, threshold)
