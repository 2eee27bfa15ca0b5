"""Focal loss against hand-computed values; metrics on a known confusion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xrwatch_training.losses import FocalLoss, build_loss
from xrwatch_training.metrics import classification_metrics


def test_focal_gamma_zero_is_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(8, 4), torch.randint(0, 4, (8,))
    torch.testing.assert_close(
        FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target)
    )


def test_focal_hand_computed() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 0])
    p0 = math.exp(2) / (math.exp(2) + 1)  # 0.8808
    p1 = 1 / (1 + math.e)  # 0.2689
    expected = (-((1 - p0) ** 2) * math.log(p0) - ((1 - p1) ** 2) * math.log(p1)) / 2
    assert math.isclose(float(FocalLoss(gamma=2.0)(logits, target)), expected, rel_tol=1e-5)
    alpha = [0.25, 0.75]
    expected_a = 0.25 * expected  # both targets are class 0
    got = float(FocalLoss(gamma=2.0, alpha=alpha)(logits, target))
    assert math.isclose(got, expected_a, rel_tol=1e-5)
    assert isinstance(build_loss("ce", 2), torch.nn.CrossEntropyLoss)


def test_metrics_known_case() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    probs = np.eye(4)[pred] * 0.9 + 0.025
    m = classification_metrics(y, probs, ["A", "B", "C", "D"])
    assert m["accuracy"] == 6 / 8
    assert math.isclose(m["balanced_accuracy"], (3 / 4 + 1 + 1 / 2) / 3)  # D absent: not counted
    assert m["per_class"]["A"]["sensitivity"] == 0.75
    assert math.isclose(m["per_class"]["A"]["ppv"], 3 / 4)
    assert m["per_class"]["D"]["auroc"] is None
    assert m["confusion_matrix"][0] == [3, 1, 0, 0]
    assert m["confusion_matrix"][2] == [1, 0, 1, 0]


def test_bootstrap_metrics_agree_with_scikit_learn() -> None:
    """xrwatch.metrics_ci (numpy only) computes what training.metrics (scikit-learn) does."""
    from xrwatch.metrics_ci import metrics_from_confusion

    rng = np.random.default_rng(3)
    for n_classes, absent in ((4, 3), (3, None), (2, None)):
        y = rng.integers(0, n_classes, 200)
        if absent is not None:
            y[y == absent] = 0  # a class with no image, as COVID-19 in the official TEST
        probs = rng.random((200, n_classes))
        ref = classification_metrics(y, probs, [f"c{i}" for i in range(n_classes)])
        mine = metrics_from_confusion(np.array(ref["confusion_matrix"]))
        for name in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert float(mine[name]) == pytest.approx(ref[name]), name
