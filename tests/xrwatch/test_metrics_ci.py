"""Bootstrap-over-patients confidence intervals and class coverage, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from xrwatch.metrics_ci import (
    bootstrap_ci,
    bootstrap_replicates,
    coverage_note,
    format_ci,
    metrics_from_confusion,
)


def test_metrics_of_a_confusion_matrix_by_hand() -> None:
    # y_true 0 0 1 1 2, y_pred 0 1 1 1 0
    cm = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    m = metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # F1: class 0 2*1/(2+1+1) = 0.5; class 1 2*2/(4+1+0) = 0.8; class 2 never right: 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # a class absent from the truth does not count towards the means (as scikit-learn)
    absent = metrics_from_confusion(np.array([[2, 0, 1], [0, 1, 0], [0, 0, 0]]))
    assert absent["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert absent["macro_f1"] == pytest.approx((2 * 2 / (4 + 0 + 1) + 1.0) / 2)


def test_patients_not_images_are_resampled() -> None:
    # patient A: two images, both right; patient B: one image, wrong.
    # Resampling 2 patients from 2: AA (1/4) -> 1, AB (1/2) -> 2/3, BB (1/4) -> 0.
    # Resampling the 3 images instead would also give 1/3.
    reps = bootstrap_replicates([0, 0, 1], [0, 0, 0], ["A", "A", "B"], 2, n_boot=4000, seed=1)
    acc = reps["accuracy"]
    values, counts = np.unique(np.round(acc, 6), return_counts=True)
    assert values.tolist() == [0.0, round(2 / 3, 6), 1.0]
    assert counts / len(acc) == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    ci = bootstrap_ci([0, 0, 1], [0, 0, 0], ["A", "A", "B"], 2, n_boot=4000, seed=1)
    assert ci["accuracy"] == [0.0, 1.0]
    assert (ci["patients"], ci["unit"], ci["level"]) == (2, "patient", 0.95)


def test_interval_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 3, 300))
    groups = [f"p{i // 3}" for i in range(300)]
    a = bootstrap_ci(y, pred, groups, 3, seed=5)
    assert a == bootstrap_ci(y, pred, groups, 3, seed=5)
    assert a != bootstrap_ci(y, pred, groups, 3, seed=6)
    point = metrics_from_confusion(np.bincount(y * 3 + pred, minlength=9).reshape(3, 3))
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        lo, hi = a[name]
        assert lo < float(point[name]) < hi and hi - lo < 0.2


def test_empty_split_and_mismatched_lengths() -> None:
    assert bootstrap_ci([], [], [], 3)["accuracy"] is None
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_ci([0], [0, 1], ["a"], 2)


def test_coverage_note_names_the_classes_a_figure_covers() -> None:
    classes = ("Normal", "Bacteria", "Virus", "COVID-19")
    metrics = {"per_class": {c: {"support": 0 if c == "COVID-19" else 5} for c in classes}}
    assert coverage_note(metrics, classes) == (
        " (covers Normal, Bacteria, Virus only: no COVID-19 image)"
    )
    metrics["per_class"]["COVID-19"]["support"] = 1
    assert coverage_note(metrics, classes) == ""
    assert format_ci({"accuracy": [0.5812, 0.6594]}, "accuracy") == "[58.1–65.9]"
    assert format_ci(None, "accuracy") == ""


def test_degenerate_proportions_get_the_exact_clopper_pearson_interval() -> None:
    from xrwatch.metrics_ci import bootstrap_ci, clopper_pearson_degenerate

    assert clopper_pearson_degenerate(30, 30)[0] == pytest.approx(0.8843, abs=1e-4)
    assert clopper_pearson_degenerate(0, 30) == pytest.approx([0.0, 1 - 0.8843], abs=1e-4)
    assert clopper_pearson_degenerate(15, 30) is None
    y = [0] * 15 + [1] * 15
    groups = [f"p{i}" for i in range(30)]
    ci = bootstrap_ci(y, y, groups, 2)
    assert ci["accuracy"][0] == pytest.approx(0.8843, abs=1e-4) and ci["accuracy"][1] == 1.0
    assert ci["exact"] == {"accuracy": "clopper-pearson"}
    # two images per patient: the patients are the trials (15/15 -> 0.782)
    ci2 = bootstrap_ci(y, y, [f"p{i // 2}" for i in range(30)], 2)
    assert ci2["accuracy"][0] == pytest.approx(clopper_pearson_degenerate(15, 15)[0])
    mixed = bootstrap_ci(y, [0] * 30, groups, 2)
    assert "exact" not in mixed and mixed["accuracy"][0] < 0.5 < mixed["accuracy"][1]
