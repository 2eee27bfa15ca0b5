"""The low_confidence rule's figures: flag rates, the risk-coverage table, and the
threshold chosen on validation predictions."""

from __future__ import annotations

import numpy as np
import pytest

from xrwatch.evaluation import choose_low_confidence, flag_rates, risk_coverage


def test_flag_rates_count_by_hand() -> None:
    correct = np.array([True, True, True, False, False, True])
    confidence = np.array([0.95, 0.55, 0.8, 0.45, 0.9, 0.6])
    r = flag_rates(correct, confidence, 0.7)  # flags 0.55, 0.45, 0.6
    assert r["flagged"] == 3 and r["flagged_share"] == pytest.approx(0.5)
    assert r["wrong_flagged"] == pytest.approx(1 / 2)  # 0.45 yes, 0.9 no
    assert r["right_flagged"] == pytest.approx(2 / 4)  # 0.55, 0.6
    assert r["accuracy_unflagged"] == pytest.approx(2 / 3)  # 0.95, 0.8 right; 0.9 wrong
    assert flag_rates(correct, confidence, 0.0)["accuracy_unflagged"] == pytest.approx(4 / 6)
    none = flag_rates(np.array([True]), np.array([0.3]), 0.5)
    assert none["wrong_flagged"] is None and none["accuracy_unflagged"] is None


def test_risk_coverage_accuracy_rises_as_more_is_flagged_on_separable_data() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 500)
    correct = rng.uniform(0.3, 1.0, 500) < confidence  # more confident: more often right
    table = risk_coverage(correct, confidence, (0.4, 0.6, 0.8))
    shares = [r["flagged_share"] for r in table]
    accuracy = [r["accuracy_unflagged"] for r in table]
    assert shares == sorted(shares) and accuracy == sorted(accuracy)


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.25])
def test_chosen_threshold_keeps_the_right_ones_within_the_budget(budget: float) -> None:
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.25, 1.0, 400)
    correct = rng.uniform(0.0, 1.0, 400) < confidence
    chosen = choose_low_confidence(correct, confidence, max_right_flagged=budget)
    t = chosen["threshold"]
    assert t == round(t, 2)
    right = confidence[correct]
    assert (right < t).mean() <= budget
    assert (right < t + 0.01).mean() > budget  # the highest such round threshold
    assert chosen["wrong_flagged"] == pytest.approx((confidence[~correct] < t).mean())


def test_nothing_right_cannot_choose() -> None:
    with pytest.raises(ValueError, match="no right prediction"):
        choose_low_confidence(np.array([False, False]), np.array([0.4, 0.9]))
