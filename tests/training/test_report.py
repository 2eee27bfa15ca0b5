from __future__ import annotations

import csv
from pathlib import Path

from training.report import write_table1


def _result(val_bal: float, test_bal: float, run_dir: str) -> dict[str, object]:
    return {
        "run_dir": run_dir,
        "setup": "s",
        "best_epoch": 3,
        "train_accuracy": 0.9,
        "val_accuracy": 0.8,
        "val_balanced_accuracy": val_bal,
        "test_accuracy": 0.7,
        "test_balanced_accuracy": test_bal,
        "test_macro_f1": 0.6,
        "test_auroc_macro": 0.85,
        "avg_train_accuracy": 0.8,
        "avg_val_accuracy": 0.75,
    }


def test_table1_names_the_best_run_by_validation_not_test(tmp_path: Path) -> None:
    results = {
        "PRCE": _result(val_bal=0.60, test_bal=0.90, run_dir="runs/PRCE"),  # best on test
        "PRCW": _result(val_bal=0.80, test_bal=0.70, run_dir="runs/PRCW"),  # best on validation
    }
    md, csv_path = write_table1(results, tmp_path)
    text = md.read_text()
    assert "Best run by validation balanced accuracy" in text
    assert "**PRCW** (80.0 % on validation, 70.0 % on test), `runs/PRCW`" in text
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["experiment"] for r in rows] == ["PRCE", "PRCW"]
    assert rows[1]["val_balanced_acc"] == "0.8"
    assert (tmp_path / "table1.json").is_file()
