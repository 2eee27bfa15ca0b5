"""95 % confidence intervals of accuracy-type metrics by bootstrap over patients; which
classes a figure covers. numpy only (no torch, no scikit-learn), so training and the
serving install can both use it.

Images of one patient are not independent, so the bootstrap resamples **patients** with
replacement (each draw brings all of that patient's images) and recomputes the metric on
each resample; the interval is the 2.5th–97.5th percentile of those values (percentile
bootstrap, seeded). Metrics follow :mod:`training.metrics` (scikit-learn's definitions):

* accuracy: correct / images;
* balanced accuracy: mean sensitivity over the classes present in the (re)sample;
* macro-F1: mean F1 over the classes present in the (re)sample (a class never predicted
  has F1 0).

Where the bootstrap degenerates - a proportion of 0/n or n/n, whose every resample gives
the same value, so the percentile interval is a point ("1.000 (1.000-1.000)") - the
interval is the exact binomial (Clopper-Pearson) one instead, with the patients as trials
(conservative: images of one patient are not independent): for n/n it is
[(alpha/2)^(1/n), 1], e.g. [0.884, 1] for 30/30. :func:`clopper_pearson_degenerate`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
N_BOOT = 1000  # resamples: the interval's ends move by well under a point at this count


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro-F1 of confusion matrices ``[..., C, C]``
    (rows true, columns predicted); NaN where a matrix is empty."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)  # per true class
    predicted = cm.sum(axis=-2)
    total = support.sum(axis=-1)
    present = support > 0
    n_present = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = tp.sum(axis=-1) / total
        recall = np.where(present, tp / np.where(present, support, 1), 0.0)
        balanced = recall.sum(axis=-1) / n_present
        denom = 2 * tp + (predicted - tp) + (support - tp)
        f1 = np.where(present, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        macro_f1 = f1.sum(axis=-1) / n_present
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "macro_f1": macro_f1}


def bootstrap_replicates(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    groups: Sequence[str],
    n_classes: int,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Each metric on ``n_boot`` resamples of the patients (``groups``: one id per image)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if not (len(y_true) == len(y_pred) == len(groups)):
        raise ValueError(
            f"y_true, y_pred and groups differ in length: {len(y_true)}, {len(y_pred)}, "
            f"{len(groups)}"
        )
    if len(y_true) == 0:
        return {m: np.full(n_boot, np.nan) for m in METRICS}
    patients, which = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    # one confusion matrix per patient, flattened: P x C²
    per_patient = np.zeros((len(patients), n_classes * n_classes))
    np.add.at(per_patient, (which, y_true * n_classes + y_pred), 1.0)
    rng = np.random.default_rng(seed)
    p = len(patients)
    draws = rng.multinomial(p, np.full(p, 1.0 / p), size=n_boot)  # B x P: times each is drawn
    cms = (draws @ per_patient).reshape(n_boot, n_classes, n_classes)
    return metrics_from_confusion(cms)


def clopper_pearson_degenerate(k: int, n: int, level: float = 0.95) -> list[float] | None:
    """The exact (Clopper-Pearson) interval of ``k`` successes in ``n`` trials when ``k`` is
    0 or ``n`` (the cases a bootstrap cannot show); None otherwise or for ``n`` = 0."""
    if n <= 0 or k not in (0, n):
        return None
    edge = ((1 - level) / 2) ** (1 / n)
    return [0.0, float(1 - edge)] if k == 0 else [float(edge), 1.0]


def exact_if_degenerate(
    value: float | None, n: int, ci: list[float] | None, level: float = 0.95
) -> tuple[list[float] | None, str]:
    """``(interval, method)``: ``ci`` with ``"percentile bootstrap"``, unless ``value`` is a
    proportion of 0 or 1 over ``n`` trials: then the Clopper-Pearson interval."""
    if value is not None and n > 0 and value in (0.0, 1.0):
        exact = clopper_pearson_degenerate(round(value * n), n, level)
        if exact is not None:
            return exact, "clopper-pearson"
    return ci, "percentile bootstrap"


def bootstrap_ci(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    groups: Sequence[str],
    n_classes: int,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """``{"level", "n_boot", "seed", "unit", "patients", metric: [low, high], ...}``: the
    percentile bootstrap interval of each metric, resampling patients; ``None`` when no
    resample gives a value."""
    reps = bootstrap_replicates(y_true, y_pred, groups, n_classes, n_boot=n_boot, seed=seed)
    tail = 100 * (1 - level) / 2
    out: dict[str, Any] = {
        "level": level,
        "method": "percentile bootstrap",
        "unit": "patient",
        "patients": len(set(groups)),
        "n_boot": n_boot,
        "seed": seed,
    }
    for name, values in reps.items():
        finite = values[np.isfinite(values)]
        out[name] = (
            [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]
            if len(finite)
            else None
        )
    # all right or all wrong: every resample agrees, so the interval is the exact one
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true):
        accuracy = float((y_true == y_pred).mean())
        exact, method = exact_if_degenerate(accuracy, out["patients"], out["accuracy"], level)
        if method != "percentile bootstrap":
            out["accuracy"] = exact
            out["exact"] = {"accuracy": method}
    return out


def missing_classes(metrics: Mapping[str, Any], classes: Sequence[str]) -> list[str]:
    """The ``classes`` with no image in the split ``metrics`` were computed on (from
    ``per_class`` supports); empty when every class is there or nothing is known."""
    per_class = metrics.get("per_class") or {}
    if not per_class:
        return []
    return [c for c in classes if not (per_class.get(c) or {}).get("support")]


def coverage_note(metrics: Mapping[str, Any], classes: Sequence[str]) -> str:
    """``""`` when the split holds every class, else e.g. ``" (covers Normal, Bacteria,
    Virus only: no COVID-19 image)"``, to append wherever the figure is shown."""
    missing = missing_classes(metrics, classes)
    if not missing:
        return ""
    covered = [c for c in classes if c not in missing]
    return f" (covers {', '.join(covered)} only: no {', '.join(missing)} image)"


def format_ci(ci: Mapping[str, Any] | None, name: str, *, percent: bool = True) -> str:
    """``"[58.3–65.9]"`` (or in 0–1 units), ``""`` when there is no interval."""
    if not ci or not ci.get(name):
        return ""
    lo, hi = ci[name]
    scale = 100 if percent else 1
    digits = 1 if percent else 3
    return f"[{lo * scale:.{digits}f}–{hi * scale:.{digits}f}]"
