"""The model card's metrics: intervals, and which classes a figure covers."""

from __future__ import annotations

from xrwatch_export.card import _metric_rows

CLASSES = ("Normal", "Bacteria", "Virus", "COVID-19")


def test_card_names_the_classes_a_test_figure_covers_and_its_interval() -> None:
    per_class = {c: {"support": 0 if c == "COVID-19" else 9} for c in CLASSES}
    metrics = {
        "val": {"accuracy": 0.8, "balanced_accuracy": 0.7, "macro_f1": 0.6,
                "per_class": {c: {"support": 3} for c in CLASSES}},
        "test": {"accuracy": 0.97, "balanced_accuracy": 0.97, "macro_f1": 0.9,
                 "per_class": per_class, "ci95": {"accuracy": [0.95, 0.985]}},
    }  # fmt: skip
    val, test = _metric_rows(metrics, CLASSES)
    assert val.endswith("| all classes |")
    assert "| 0.9700 [0.950–0.985] |" in test
    assert test.endswith("| covers Normal, Bacteria, Virus only: no COVID-19 image |")
