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
    from training.ranking import RunScore, comparable_groups, mixed_groups_message, rank

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


def write_table1(results: dict[str, dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """``table1.md`` and ``table1.csv``: Tr/Val/Tst accuracy of each experiment, the study's
    published figures beside them, and our extra metrics; names the best run."""
    from training.presets import EXPERIMENT_NOTES, PUBLISHED, PUBLISHED_TEST_ACCURACY_RANGE

    lo, hi = PUBLISHED_TEST_ACCURACY_RANGE
    columns = [
        "experiment", "setup", "train_acc", "val_acc", "test_acc",
        "avg_train_acc_over_epochs", "avg_val_acc_over_epochs",
        "val_balanced_acc", "test_balanced_acc", "test_macro_f1", "test_auroc_macro",
        "published_train_acc", "published_val_acc", "published_test_acc", "best_epoch", "run_dir",
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for name, r in results.items():
        pub = PUBLISHED.get(name, {})
        rows.append({
            "experiment": name,
            "setup": r.get("setup") or EXPERIMENT_NOTES.get(name, name),
            "train_acc": r.get("train_accuracy"),
            "val_acc": r.get("val_accuracy"),
            "test_acc": r.get("test_accuracy"),
            "avg_train_acc_over_epochs": r.get("avg_train_accuracy"),
            "avg_val_acc_over_epochs": r.get("avg_val_accuracy"),
            "val_balanced_acc": r.get("val_balanced_accuracy"),
            "test_balanced_acc": r.get("test_balanced_accuracy"),
            "test_macro_f1": r.get("test_macro_f1"),
            "test_auroc_macro": r.get("test_auroc_macro"),
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
    lines = [
        "# Table 1: the study's six experiments, reproduced",
        "",
        "Accuracy in percent. Tr/Val/Tst: the best epoch's (by validation balanced accuracy) "
        "training, validation and test accuracy; avg: the study's mean accuracy over all epochs. "
        "Published: the study (Bolhassani 2021, arXiv:2105.08382) reports test accuracies from "
        f"{lo} % to {hi} % across these six experiments; its per-experiment Tr/Val/Tst figures "
        "were not available offline, so they are shown as – rather than guessed.",
        "",
        "| Exp. | setup | Tr | Val | Tst | avg Tr | avg Val | Tst bal. acc | Tst macro-F1 "
        "| Tst AUROC | published Tr/Val/Tst |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        published = "/".join(
            "–" if r[k] is None else f"{r[k]:.1f}"
            for k in ("published_train_acc", "published_val_acc", "published_test_acc")
        )
        lines.append(
            f"| {r['experiment']} | {r['setup']} | {_pct(r['train_acc'])} | {_pct(r['val_acc'])} "
            f"| {_pct(r['test_acc'])} | {_pct(r['avg_train_acc_over_epochs'])} "
            f"| {_pct(r['avg_val_acc_over_epochs'])} | {_pct(r['test_balanced_acc'])} "
            f"| {_pct(r['test_macro_f1'])} | {_pct(r['test_auroc_macro'])} | {published} |"
        )
    lines.append("")
    lines.append(f"Published test accuracy range over the six: {lo}–{hi} %.")
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
