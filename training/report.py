"""Run-folder artefacts: ``metrics.csv``, ``curves.png``, ``confusion_matrix.png``, and the
reproduction's ``table1.md``/``table1.csv`` beside the study's published figures."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_macro_f1",
    "val_auroc_macro",
    "train_images_per_s",
    "epoch_seconds",
)


def write_json(path: Path, data: Any) -> Path:
    """``data`` as indented UTF-8 JSON, atomically: ``test_metrics.json`` marks a finished
    run for ``xrwatch reproduce``, so a half-written file must never exist."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_metrics_csv(history: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per epoch; rewritten whole (atomically) each epoch, read back by --resume."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRICS_COLUMNS})
    os.replace(tmp, path)


def read_metrics_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows.append(
                {
                    k: (int(v) if k == "epoch" else float(v) if v != "" else None)
                    for k, v in row.items()
                }
            )
    return rows


def plot_curves(history: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Train/val accuracy and loss against epoch, as the study's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, label in ((ax_acc, "accuracy", "accuracy"), (ax_loss, "loss", "loss")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [r.get(f"{split}_{key}") for r in history]
            ax.plot(epochs, [float("nan") if v is None else v for v in values], style,
                    label=split, markersize=3)  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 2), constrained_layout=True)
    ax.imshow(matrix, cmap="Blues")
    peak = max((max(r) for r in matrix), default=0) or 1
    for i in range(n):
        for j in range(n):
            v = matrix[i][j]
            ax.text(j, i, str(v), ha="center", va="center",
                    color="white" if v > peak / 2 else "black")  # fmt: skip
    ax.set_xticks(range(n), classes, rotation=30, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _as_key(value: Any) -> Any:
    """A comparison key back from JSON (lists) to tuples."""
    return tuple(_as_key(v) for v in value) if isinstance(value, list | tuple) else value


def _best_run(results: dict[str, dict[str, Any]]) -> tuple[str | None, str | None]:
    """(the best experiment's name, None) or (None, why none is named)."""
    from .ranking import RunScore, comparable_groups, mixed_groups_message, rank

    def score(name: str) -> RunScore:
        r = results[name]
        key = _as_key(r.get("comparison_key") or ())
        return RunScore(str(r.get("run_dir") or name), r.get("val_balanced_accuracy"),
                        r.get("val_loss"), key)  # fmt: skip

    scored = [n for n, r in results.items() if r.get("val_balanced_accuracy") is not None]
    if not scored:
        return None, None
    groups = comparable_groups(scored, score)
    if len(groups) > 1:
        return None, mixed_groups_message(groups, score).replace("\n", " ")
    return rank(scored, score)[0], None


def _ci_pct(r: dict[str, Any], key: str) -> str:
    ci = r.get(key)
    return f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]" if ci else ""


def write_table1(results: dict[str, dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """``table1.md``/``.csv``/``.json``: Tr/Val/Tst accuracy of each experiment with 95 %
    intervals, the study's own Table 1 figures beside them, our extra metrics, which classes
    the test figures cover, and the best run (by :mod:`training.ranking`)."""
    from .presets import (
        ASSUMPTIONS,
        CLASS_TOTALS_NOTE,
        EXPERIMENT_NOTES,
        PUBLISHED,
        PUBLISHED_WITH_EXTRA,
    )

    columns = [
        "experiment", "setup", "train_acc", "val_acc", "val_acc_ci_low", "val_acc_ci_high",
        "test_acc", "test_acc_ci_low", "test_acc_ci_high",
        "avg_train_acc_over_epochs", "avg_val_acc_over_epochs",
        "val_balanced_acc", "test_balanced_acc", "test_balanced_acc_ci_low",
        "test_balanced_acc_ci_high", "test_macro_f1", "test_auroc_macro", "test_classes_missing",
        "published_train_acc", "published_val_acc", "published_test_acc", "best_epoch", "run_dir",
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for name, r in results.items():
        # the study's Table 2 when COVID-19 images were added (--extra), else its Table 1
        pub = (PUBLISHED_WITH_EXTRA if r.get("extra") else PUBLISHED).get(name, {})
        val_ci, test_ci = (
            r.get("val_accuracy_ci") or [None, None],
            r.get("test_accuracy_ci") or [None, None],
        )
        bal_ci = r.get("test_balanced_accuracy_ci") or [None, None]
        rows.append({
            "experiment": name,
            "setup": r.get("setup") or EXPERIMENT_NOTES.get(name, name),
            "train_acc": r.get("train_accuracy"),
            "val_acc": r.get("val_accuracy"),
            "val_acc_ci_low": val_ci[0],
            "val_acc_ci_high": val_ci[1],
            "test_acc": r.get("test_accuracy"),
            "test_acc_ci_low": test_ci[0],
            "test_acc_ci_high": test_ci[1],
            "avg_train_acc_over_epochs": r.get("avg_train_accuracy"),
            "avg_val_acc_over_epochs": r.get("avg_val_accuracy"),
            "val_balanced_acc": r.get("val_balanced_accuracy"),
            "test_balanced_acc": r.get("test_balanced_accuracy"),
            "test_balanced_acc_ci_low": bal_ci[0],
            "test_balanced_acc_ci_high": bal_ci[1],
            "test_macro_f1": r.get("test_macro_f1"),
            "test_auroc_macro": r.get("test_auroc_macro"),
            "test_classes_missing": ";".join(r.get("test_classes_missing") or []) or None,
            "published_train_acc": pub.get("train"),
            "published_val_acc": pub.get("val"),
            "published_test_acc": pub.get("test"),
            "best_epoch": r.get("best_epoch"),
            "run_dir": r.get("run_dir"),
        })  # fmt: skip
    csv_path = out_dir / "table1.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row[k] is None else row[k]) for k in columns})
    # The best run is chosen on validation by training.ranking, the rule `export --best`
    # uses: choosing on the test set would make its test figures optimistic.
    best, mixed = _best_run(results)
    missing = sorted({c for r in results.values() for c in r.get("test_classes_missing") or []})
    mark = "¹" if missing else ""
    lines = [
        "# Table 1: the study's six experiments, reproduced",
        "",
        "Accuracy in percent; in brackets the 95 % confidence interval (percentile bootstrap "
        "over patients, seeded). Tr/Val/Tst: the best epoch's (by validation balanced accuracy) "
        "training, validation and test accuracy; avg: mean accuracy over all epochs; bal. "
        "acc: balanced accuracy (Val bal. acc is the figure the best run is chosen by). Study: "
        "the Train/Validation/Test accuracy of Table 1 of Bolhassani 2021 (arXiv:2105.08382; "
        "Table 2 for runs with extra COVID-19 images).",
        "",
        "| Exp. | setup | Tr | Val | Tst" + mark + " | avg Tr | avg Val | Val bal. acc "
        + "| Tst bal. acc" + mark + " | Tst macro-F1 | Tst AUROC | study Tr/Val/Tst |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in zip(results, rows, strict=True):
        res = results[name]
        published = " / ".join(
            "–" if r[k] is None else f"{r[k]:g}"
            for k in ("published_train_acc", "published_val_acc", "published_test_acc")
        )
        lines.append(
            f"| {r['experiment']} | {r['setup']} | {_pct(r['train_acc'])} "
            f"| {_pct(r['val_acc'])}{_ci_pct(res, 'val_accuracy_ci')} "
            f"| {_pct(r['test_acc'])}{_ci_pct(res, 'test_accuracy_ci')} "
            f"| {_pct(r['avg_train_acc_over_epochs'])} | {_pct(r['avg_val_acc_over_epochs'])} "
            f"| {_pct(r['val_balanced_acc'])}{_ci_pct(res, 'val_balanced_accuracy_ci')} "
            f"| {_pct(r['test_balanced_acc'])}{_ci_pct(res, 'test_balanced_accuracy_ci')} "
            f"| {_pct(r['test_macro_f1'])} | {_pct(r['test_auroc_macro'])} | {published} |"
        )
    lines.append("")
    if missing:
        classes = next((r.get("classes") for r in results.values() if r.get("classes")), None)
        covered = [c for c in classes or [] if c not in missing]
        lines.append(
            f"¹ The test set holds no {', '.join(missing)} image: test figures cover "
            f"{', '.join(covered) or 'the other classes'} only (`--split patient` carves a "
            "test set with every class)."
        )
    lines += [
        "Which accuracy the study reports (final epoch or averaged over epochs) is not stated "
        "unambiguously; its metric section says the mean over epochs, closest to our avg "
        "columns (xrwatch tests only the chosen checkpoint, so there is no averaged test "
        "figure). " + CLASS_TOTALS_NOTE,
        "",
        "Settings the study does not state are xrwatch's assumptions: "
        + "; ".join(f"{k}: {v}" for k, v in ASSUMPTIONS.items())
        + ".",
        "",
    ]
    if best is not None:
        b = results[best]
        lines.append(
            f"Best run by validation balanced accuracy (as `xrwatch export --best` picks; ties "
            f"go to the lower validation loss, then the run path): **{best}** "
            f"({_pct(b.get('val_balanced_accuracy'))} % on validation, "
            f"{_pct(b.get('test_balanced_accuracy'))} % on test), `{b.get('run_dir')}`."
        )
    elif mixed:
        lines.append(f"No best run named: {mixed}")
    md_path = out_dir / "table1.md"
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(out_dir / "table1.json", results)
    return md_path, csv_path
