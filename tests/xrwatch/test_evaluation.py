"""xrwatch.evaluation: metrics against scikit-learn, and the patient bootstrap by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from xrwatch.evaluation import auroc, evaluate_with_ci, point_metrics

CLASSES = ("Normal", "Bacteria", "Virus", "COVID-19")


def _random_case(seed: int, n: int = 60, k: int = 4, drop_class: int | None = None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    if drop_class is not None:
        y[y == drop_class] = (drop_class + 1) % k
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y] * rng.random((n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[:5] = np.round(probs[:5], 1)  # some tied scores
    return y, probs


@pytest.mark.parametrize("seed,drop", [(0, None), (1, None), (2, 3), (3, 0)])
def test_point_metrics_match_scikit_learn(seed: int, drop: int | None) -> None:
    sk = pytest.importorskip("sklearn.metrics")
    y, probs = _random_case(seed, drop_class=drop)
    pred = probs.argmax(1)
    m = point_metrics(y, probs, 4)
    present = sorted(set(y.tolist()))
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(
        sk.f1_score(y, pred, labels=present, average="macro", zero_division=0)
    )
    prec, rec, f1, support = sk.precision_recall_fscore_support(
        y, pred, labels=[0, 1, 2, 3], zero_division=0
    )
    aurocs = []
    for i in range(4):
        if support[i]:
            assert m["sensitivity"][i] == pytest.approx(rec[i])
            assert m["f1"][i] == pytest.approx(f1[i])
            ref = sk.roc_auc_score(y == i, probs[:, i])
            assert m["auroc"][i] == pytest.approx(ref)
            aurocs.append(ref)
        else:
            assert m["sensitivity"][i] is None and m["f1"][i] is None and m["auroc"][i] is None
        if (pred == i).any():
            assert m["ppv"][i] == pytest.approx(prec[i])
        else:
            assert m["ppv"][i] is None
    assert m["auroc_macro"] == pytest.approx(np.mean(aurocs))
    assert m["confusion_matrix"] == sk.confusion_matrix(y, pred, labels=[0, 1, 2, 3]).tolist()


def test_auroc_by_hand() -> None:
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4)=1, (0.8>0.1)=1, (0.4=0.4)=0.5,
    # (0.4>0.1)=1 -> 3.5 / 4
    assert auroc(np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.4, 0.1])) == pytest.approx(0.875)
    assert auroc(np.array([1, 1]), np.array([0.2, 0.3])) is None


def test_bootstrap_resamples_patients_not_images() -> None:
    # Patient A: 3 images all right; patient B: 1 image wrong. Resampling patients, a
    # replicate's accuracy is 1 (AA), 0 (BB) or 3/4 (AB/BA): never 1/2 or 2/3, which
    # resampling images would give. The 95 % interval spans the extremes: [0, 1].
    y = [0, 0, 0, 1]
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    result = evaluate_with_ci(y, probs, ["A", "A", "A", "B"], ("x", "y"), replicates=400, seed=1)
    assert result["n_patients"] == 2 and result["n_images"] == 4
    assert result["accuracy"]["value"] == pytest.approx(0.75)
    assert result["accuracy"]["ci"] == pytest.approx([0.0, 1.0])
    # class y is present only when B is drawn (3 of 4 replicates on average)
    n_y = result["per_class"]["y"]["sensitivity"]["n_defined"]
    assert 0.6 * 400 < n_y < 0.9 * 400
    assert result["per_class"]["y"]["patients"] == 1


def test_bootstrap_is_seeded_and_covers_the_estimate() -> None:
    y, probs = _random_case(5, n=120)
    groups = [f"p{i // 3}" for i in range(len(y))]
    a = evaluate_with_ci(y, probs, groups, CLASSES, replicates=300, seed=7)
    b = evaluate_with_ci(y, probs, groups, CLASSES, replicates=300, seed=7)
    assert a == b
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro"):
        lo, hi = a[key]["ci"]
        assert lo <= a[key]["value"] <= hi and hi - lo > 0


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="patient groups"):
        evaluate_with_ci([0, 1], np.eye(2), ["a"], ("x", "y"))
    with pytest.raises(ValueError, match="probabilities"):
        evaluate_with_ci([0, 1], np.eye(3), ["a", "b"], ("x", "y"))


def test_summary_intervals_equal_training_intervals() -> None:
    """The same resamples as xrwatch.metrics_ci: evaluate and training quote one interval."""
    from xrwatch.metrics_ci import bootstrap_ci

    y, probs = _random_case(11, n=90)
    groups = [f"p{i // 2}" for i in range(len(y))]
    ours = evaluate_with_ci(y, probs, groups, CLASSES, replicates=200, seed=3)
    theirs = bootstrap_ci(y, probs.argmax(1), groups, 4, n_boot=200, seed=3)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert ours[key]["ci"] == pytest.approx(theirs[key])


def test_all_correct_sets_get_exact_intervals_instead_of_a_point() -> None:
    from xrwatch.evaluation import evaluate_with_ci

    y = [0] * 15 + [1] * 15
    probs = np.eye(2)[y] * 0.9 + 0.05
    out = evaluate_with_ci(y, probs, [f"p{i}" for i in range(30)], ["A", "B"], replicates=100)
    assert out["accuracy"]["ci"][0] == pytest.approx(0.8843, abs=1e-4)
    assert out["accuracy"]["ci_method"] == "clopper-pearson"
    sens = out["per_class"]["A"]["sensitivity"]
    assert sens["ci"][0] == pytest.approx(0.7820, abs=1e-4)  # 15/15 patients
    assert out["auroc_macro"]["ci"] == [1.0, 1.0]  # not a proportion: left as it is
