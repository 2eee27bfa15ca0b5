"""Classification metrics with scikit-learn: one dict per split and epoch, JSON-ready.

Balanced accuracy (the mean of per-class sensitivities) selects the best checkpoint, not
accuracy: CoronaHack's classes are imbalanced (TRAIN: 2,535 Bacteria vs 58 COVID-19), so a
model that never predicts COVID-19 or Virus can still score a high plain accuracy. Only
classes present in the split count towards balanced accuracy and macro averages of
sensitivity; AUROC is computed one-vs-rest for each class that has both positives and
negatives in the split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

logger = logging.getLogger(__name__)


def _f(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, loss: float | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class sensitivity/PPV/F1/AUROC, confusion."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(classes)))
    if len(y_true) == 0:
        return {"n": 0, "loss": loss, "accuracy": None, "balanced_accuracy": None,
                "macro_f1": None, "auroc_macro": None, "per_class": {},
                "confusion_matrix": [[0] * len(classes) for _ in classes]}  # fmt: skip
    y_pred = probs.argmax(axis=1)
    present = sorted(set(y_true.tolist()))
    prec, rec, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class: dict[str, dict[str, Any]] = {}
    aurocs = []
    for i, name in enumerate(classes):
        positives = y_true == i
        auroc = None
        if 0 < positives.sum() < len(y_true):
            auroc = float(roc_auc_score(positives, probs[:, i]))
            aurocs.append(auroc)
        per_class[name] = {
            "support": int(support[i]),
            "sensitivity": float(rec[i]) if support[i] else None,
            "ppv": float(prec[i]) if (y_pred == i).any() else None,
            "f1": float(f1[i]) if support[i] else None,
            "auroc": auroc,
        }
    import warnings

    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y_true, y_pred)
    return {
        "n": len(y_true),
        "loss": loss,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        ),
        "auroc_macro": _f(float(np.mean(aurocs))) if aurocs else None,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
