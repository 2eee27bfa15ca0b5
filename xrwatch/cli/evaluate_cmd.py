"""``xrwatch evaluate``: an exported model on labelled images, metrics with patient-bootstrap
CIs, as a table, JSON and a confusion-matrix PNG. Torch-free (ONNX Runtime)."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.markup import escape

from xrwatch.cli._app import EXIT_OK, app, console, progress
from xrwatch.defaults import resolve_model
from xrwatch.engine import InferenceEngine, Prediction
from xrwatch.errors import DatasetError, ReportWriteError
from xrwatch.evaluation import (
    BOOTSTRAP_REPLICATES,
    PER_CLASS_KEYS,
    evaluate_with_ci,
    flag_rates,
    risk_coverage,
)
from xrwatch.logs import configure_logging
from xrwatch.remote.options import (
    DEFAULT_TRITON_MODEL,
    TRITON_HELP,
    TRITON_MODEL_HELP,
    triton_engine,
)
from xrwatch.serve.reports import csv_cell

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Labelled:
    path: Path
    label: str
    group: str  # patient: the bootstrap's resampling unit


def load_labelled(data: Path, task: str, split: str | None = None) -> list[Labelled]:
    """The labelled images of ``data``: a run's ``splits/<name>.csv`` (path, label, group),
    a CoronaHack layout or a folder per class (indexed by ``training.data``, which is
    torch-free). ``split`` (TRAIN/TEST) keeps one CoronaHack split only."""
    if (
        data.is_file()
        and data.suffix.lower() == ".csv"
        and data.name != "Chest_xray_Corona_Metadata.csv"
    ):
        try:
            with data.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except OSError as exc:
            raise DatasetError(f"{data}: cannot read the split file: {exc}") from exc
        if not rows or not {"path", "label", "group"} <= set(rows[0]):
            raise DatasetError(
                f"{data}: expected a run's split file with columns path, label, group "
                f"(RUN/splits/test.csv); found {list(rows[0]) if rows else 'no rows'}"
            )
        out = [Labelled(Path(r["path"]), r["label"], r["group"]) for r in rows]
        if split:
            out = [s for s, r in zip(out, rows, strict=True) if r.get("source_split") == split]
        return out
    from xrwatch_training.data import index_dataset  # torch-free: indexing only lists files

    index = index_dataset(data, task)
    samples = [s for s in index.samples if split is None or s.source_split == split]
    for note, count in index.excluded.items():
        logger.info("left out %d image(s): %s", count, note)
    return [Labelled(s.path, s.label, s.group) for s in samples]


def confusion_png(matrix: list[list[int]], classes: list[str], title: str, path: Path) -> None:
    """The confusion matrix as a PNG drawn with Pillow (matplotlib is not a serving
    dependency): rows = true class, columns = predicted, cells shaded by row share."""
    from PIL import Image, ImageDraw, ImageFont

    k = len(classes)
    cell, left, top = 90, 130, 70
    img = Image.new("RGB", (left + cell * k + 20, top + cell * k + 60), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((10, 10), title, fill="black", font=font)
    draw.text((left, top - 35), "predicted", fill="black", font=font)
    draw.text((10, top + cell * k + 20), "rows: true class", fill="black", font=font)
    for j, name in enumerate(classes):
        draw.text((left + j * cell + 5, top - 18), name, fill="black", font=font)
    for i, row in enumerate(matrix):
        total = max(sum(row), 1)
        draw.text((10, top + i * cell + cell // 2 - 6), classes[i], fill="black", font=font)
        for j, count in enumerate(row):
            share = count / total
            shade = int(255 - 200 * share)
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle(
                [x0, y0, x0 + cell - 2, y0 + cell - 2], fill=(shade, shade, 255), outline="grey"
            )
            colour = "white" if share > 0.6 else "black"
            draw.text((x0 + 8, y0 + cell // 2 - 12), f"{count}", fill=colour, font=font)
            draw.text((x0 + 8, y0 + cell // 2 + 2), f"{share:.0%}", fill=colour, font=font)
    try:
        img.save(path)
    except OSError as exc:
        raise ReportWriteError(f"{path}: cannot write the confusion matrix: {exc}") from exc


def _fmt(entry: dict[str, Any]) -> str:
    if entry["value"] is None:
        return "n/a"
    text = f"{entry['value']:.3f}"
    if entry["ci"] is not None:
        text += f" ({entry['ci'][0]:.3f}-{entry['ci'][1]:.3f})"
    return text


def table_markdown(result: dict[str, Any]) -> str:
    """The metrics with CIs as Markdown (summary, then one row per class)."""
    m = result["metrics"]
    lines = [
        f"{result['n_images']} images of {result['n_patients']} patients; 95 % CIs from "
        f"{m['bootstrap']['replicates']} bootstrap replicates over patients",
        "",
        "| metric | value (95 % CI) |",
        "|---|---|",
    ]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro"):
        lines.append(f"| {key.replace('_', ' ')} | {_fmt(m[key])} |")
    lines += [
        "",
        "| class | images | patients | sensitivity | PPV | F1 | AUROC |",
        "|---|---:|---:|---|---|---|---|",
    ]
    for name, c in m["per_class"].items():
        cells = " | ".join(_fmt(c[key]) for key in PER_CLASS_KEYS)
        lines.append(f"| {name} | {c['support']} | {c['patients']} | {cells} |")
    lines += ["", "confusion matrix (rows true, columns predicted): " + json.dumps(
        dict(zip(result["classes"], m["confusion_matrix"], strict=True)))]  # fmt: skip
    return "\n".join(lines) + "\n"


def evaluate_model(
    engine: InferenceEngine,
    samples: list[Labelled],
    *,
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = 0,
    batch_size: int = 8,
    on_batch: Callable[[list[dict[str, Any]], int], None] | None = None,
) -> dict[str, Any]:
    """Predict every sample and compute the metrics with CIs; unreadable files are left
    out and listed under ``failed``. ``on_batch`` gets each batch's prediction rows (those
    that were classified) and its number of images as soon as it is done."""
    classes = list(engine.classes)
    unknown = sorted({s.label for s in samples} - set(classes))
    if unknown:
        raise DatasetError(
            f"labels {unknown} are not classes of the model {engine.path} ({classes})"
        )
    kept: list[tuple[Labelled, Prediction]] = []
    failed: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        predictions = engine.predict_paths([s.path for s in batch], batch_size=batch_size)
        done = [(s, p) for s, p in zip(batch, predictions, strict=True) if p.ok]
        failed += [{"file": p.file, "error": p.error} for p in predictions if not p.ok]
        new = [_row(s, p, classes) for s, p in done]
        kept += done
        rows += new
        if on_batch is not None:
            on_batch(new, len(batch))
    if not kept:
        raise DatasetError(f"none of the {len(samples)} image(s) could be classified")
    y = [classes.index(s.label) for s, _ in kept]
    probs = np.array([[p.probabilities[c] for c in classes] for _, p in kept])
    metrics = evaluate_with_ci(
        y, probs, [s.group for s, _ in kept], classes, replicates=replicates, seed=seed
    )
    correct = np.array([p.label == s.label for s, p in kept])
    confidence = np.array([p.confidence for _, p in kept], dtype=np.float64)
    threshold = engine.low_confidence
    return {
        "model": {"path": str(engine.path), "name": engine.meta.name,
                  "sha256": engine.model_sha256, "precision": engine.meta.precision},
        "classes": classes,
        "n_images": metrics["n_images"],
        "n_patients": metrics["n_patients"],
        "metrics": metrics,
        "low_confidence": {
            "threshold": threshold,
            "rates": None if threshold is None else flag_rates(correct, confidence, threshold),
            "risk_coverage": risk_coverage(correct, confidence),
        },
        "flags": dict(Counter(p.flag or "none" for _, p in kept)),
        "failed": failed,
        "predictions": rows,
    }  # fmt: skip


def _row(s: Labelled, p: Prediction, classes: list[str]) -> dict[str, Any]:
    return {
        "file": str(s.path), "true": s.label, "predicted": p.label, "flag": p.flag,
        "confidence": p.confidence, "group": s.group,
        **{f"prob_{c}": p.probabilities[c] for c in classes},
    }  # fmt: skip


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def risk_coverage_markdown(low: dict[str, Any], whose: str = "model") -> str:
    """The risk-coverage table: at each threshold, the share of results flagged
    low_confidence, the accuracy of the rest, and the shares of wrong and right ones flagged."""
    lines = [
        "low_confidence: flag a result whose top probability is below the threshold"
        + (f" ({whose}: {low['threshold']:g})" if low["threshold"] is not None else ""),
        "",
        "| flag below | flagged | accuracy of the unflagged | wrong ones flagged "
        "| right ones flagged |",
        "|---:|---:|---:|---:|---:|",
    ]
    rows = list(low["risk_coverage"])
    if low["rates"] is not None and low["threshold"] not in [r["threshold"] for r in rows]:
        rows = sorted([*rows, low["rates"]], key=lambda r: r["threshold"])
    for r in rows:
        mark = f" ({whose})" if r["threshold"] == low["threshold"] else ""
        lines.append(
            f"| {r['threshold']:g}{mark} | {_pct(r['flagged_share'])} | "
            f"{_pct(r['accuracy_unflagged'])} | {_pct(r['wrong_flagged'])} of {r['n_wrong']} | "
            f"{_pct(r['right_flagged'])} of {r['n_right']} |"
        )
    return "\n".join(lines) + "\n"


class _PredictionsCsv:
    """``predictions.csv`` of ``--out``, written row by row as images are classified, its
    text cells escaped as the reports escape them (no spreadsheet formulas)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None
        self._writer: Any = None

    def add(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        try:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self.path.open("w", newline="", encoding="utf-8")
                self._writer = csv.writer(self._fh, lineterminator="\n")
                self._writer.writerow(list(rows[0]))
            self._writer.writerows([[csv_cell(v) for v in row.values()] for row in rows])
            self._fh.flush()
        except OSError as exc:
            raise ReportWriteError(f"{self.path}: cannot write the predictions: {exc}") from exc

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def write_outputs(result: dict[str, Any], out: Path, title: str) -> None:
    """``evaluation.json``, ``evaluation.md`` and ``confusion_matrix.png`` in ``out``
    (``predictions.csv`` is written while the images are classified)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(
            json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2) + "\n",
            encoding="utf-8",
        )
        (out / "evaluation.md").write_text(
            f"# {title}\n\n" + table_markdown(result) + "\n"
            + risk_coverage_markdown(result["low_confidence"]),
            "utf-8",
        )  # fmt: skip
    except OSError as exc:
        raise ReportWriteError(f"{out}: cannot write the evaluation: {exc}") from exc
    confusion_png(result["metrics"]["confusion_matrix"], result["classes"], title,
                  out / "confusion_matrix.png")  # fmt: skip


@app.command("evaluate")
def evaluate_command(
    data: Path = typer.Argument(
        ...,
        help="Labelled images: a folder per class, a CoronaHack layout, or a run's "
        "splits/test.csv.",
    ),
    model: Path | None = typer.Option(
        None, "--model", "-m", help="An ONNX model (default: the model shipped with xrwatch)."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Write evaluation.json/.md, predictions.csv, confusion_matrix.png.",
    ),
    split: str | None = typer.Option(
        None, "--split", help="CoronaHack only: evaluate TRAIN or TEST rows only."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    replicates: int = typer.Option(
        BOOTSTRAP_REPLICATES, "--replicates", min=1, help="Bootstrap replicates (over patients)."
    ),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU even when a GPU is present."),
    threads: int = typer.Option(0, "--threads", min=0, help="ONNX Runtime threads (0 = all)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per model run."),
    log_level: str = typer.Option("WARNING", "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
    triton: str | None = typer.Option(None, "--triton", help=TRITON_HELP),
    triton_model: str = typer.Option(
        DEFAULT_TRITON_MODEL, "--triton-model", help=TRITON_MODEL_HELP
    ),
) -> int:
    """Evaluate a model on labelled images, with 95 % CIs over patients.

    Accuracy, balanced accuracy, macro-F1, per-class sensitivity/PPV/F1, one-vs-rest
    AUROC and the confusion matrix; each CI comes from a bootstrap that resamples patients,
    not images. Unreadable images are left out and listed. Then the risk-coverage table of
    the low_confidence flag: at a range of thresholds, the share of results flagged, the
    accuracy of the rest, and the shares of wrong and of right predictions flagged.
    """
    configure_logging(log_level)
    if triton is not None:  # the model runs on Triton server(s): xrwatch.remote
        engine: InferenceEngine = triton_engine(triton, triton_model, expected_model=model)
    else:
        engine = InferenceEngine(resolve_model(model), use_gpu=not cpu, intra_op_threads=threads)
    wanted = split.upper() if split else None
    samples = load_labelled(data, engine.meta.task, wanted)
    if not samples:
        raise DatasetError(f"{data}: no labelled image found" + (f" in {wanted}" if wanted else ""))
    logger.info("evaluating %s on %d image(s) of %s", engine.meta.name, len(samples), data)
    sink = _PredictionsCsv(out / "predictions.csv") if out is not None else None
    try:
        with progress(len(samples), "evaluating") as advance:

            def on_batch(rows: list[dict[str, Any]], n: int) -> None:
                if sink is not None:
                    sink.add(rows)
                advance(n)

            result = evaluate_model(
                engine, samples, replicates=replicates, seed=seed, batch_size=batch_size,
                on_batch=on_batch,
            )  # fmt: skip
    finally:
        if sink is not None:
            sink.close()
    result["data"] = str(data)
    title = f"{engine.meta.name} on {data}"
    if out is not None:
        write_outputs(result, out, title)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2))
    else:
        console.print(f"[bold]{escape(title)}[/] (model sha256 {engine.model_sha256[:12]})")
        console.print(escape(table_markdown(result)), highlight=False)
        console.print(escape(risk_coverage_markdown(result["low_confidence"])), highlight=False)
        counts = Counter(s.label for s in samples)
        logger.info("class counts: %s", dict(counts))
        if result["failed"]:
            console.print(f"[yellow]{len(result['failed'])} file(s) could not be read[/]")
        if out is not None:
            console.print(f"written to {escape(str(out))}")
    return EXIT_OK
