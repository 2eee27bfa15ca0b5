from __future__ import annotations

import csv
from pathlib import Path

import pytest

from xrwatch.cli._app import main
from xrwatch_training.report import write_table1


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
    lines = text.splitlines()
    header = next(x for x in lines if x.startswith("| Exp."))
    column = [c.strip() for c in header.split("|")].index("Val bal. acc")
    shown = {
        x.split("|")[1].strip(): x.split("|")[column].strip()
        for x in lines[lines.index(header) + 2 :]
        if x.startswith("| PRC")
    }
    assert shown == {"PRCE": "60.0", "PRCW": "80.0"}  # the figure the best run is chosen by
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["experiment"] for r in rows] == ["PRCE", "PRCW"]
    assert rows[1]["val_balanced_acc"] == "0.8"
    assert (tmp_path / "table1.json").is_file()


def test_table1_shows_the_studys_figures_intervals_and_class_coverage(tmp_path: Path) -> None:
    prce = {**_result(0.6, 0.5, "runs/PRCE"), "test_accuracy": 0.621,
            "val_accuracy_ci": [0.55, 0.7], "test_accuracy_ci": [0.58312, 0.65901],
            "test_balanced_accuracy_ci": [0.4, 0.6],
            "test_classes_missing": ["COVID-19"],
            "classes": ["Normal", "Bacteria", "Virus", "COVID-19"]}  # fmt: skip
    md, csv_path = write_table1({"PRCE": prce, "PRCW": _result(0.7, 0.6, "runs/PRCW")}, tmp_path)
    text = md.read_text()
    assert "range" not in text  # the study's per-experiment figures, not a range
    row = next(x for x in text.splitlines() if x.startswith("| PRCE"))
    assert row.endswith("| 81.06 / 65.39 / 62.1 |")  # the study's Table 1, PRCE
    assert "| 62.1 [58.3–65.9] |" in row and "80.0 [55.0–70.0]" in row
    assert "Tst¹" in text
    assert "¹ The test set holds no COVID-19 image: test figures cover Normal, Bacteria, " \
        "Virus only" in text  # fmt: skip
    assert "COVID-19 82" in text and "58" in text  # the class-total mismatch
    assert "xrwatch's assumptions" in text and "focal loss: γ = 2, no α" in text
    rows = {r["experiment"]: r for r in csv.DictReader(csv_path.open())}
    assert rows["PRCE"]["published_test_acc"] == "62.1"
    assert rows["PRCE"]["test_acc_ci_low"] == "0.58312"
    assert rows["PRCE"]["test_classes_missing"] == "COVID-19"
    assert rows["PRCW"]["published_val_acc"] == "73.43"


def test_reproduce_says_it_wrote_table1_json_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import xrwatch_training.reproduce

    def table_only(
        overrides: dict[str, object], only: list[str] | None = None
    ) -> tuple[Path, Path]:
        return write_table1({"PRCE": _result(0.6, 0.5, "runs/PRCE")}, tmp_path)

    monkeypatch.setattr(xrwatch_training.reproduce, "reproduce", table_only)
    assert main(["reproduce", "--data", str(tmp_path), "--out", str(tmp_path)]) == 0
    wrote = capsys.readouterr().out.replace("\n", "")
    assert f"wrote {tmp_path / 'table1.md'}, {tmp_path / 'table1.csv'} and " in wrote
    assert str(tmp_path / "table1.json") in wrote and (tmp_path / "table1.json").is_file()
    assert main(["reproduce", "--help"]) == 0
    assert "table1.json" in capsys.readouterr().out
