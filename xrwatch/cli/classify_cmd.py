"""``xrwatch classify``: classify files and folders with an exported model, no daemon."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from xrwatch import fields
from xrwatch.cli._app import EXIT_FAILED, EXIT_OK, app, console, progress
from xrwatch.defaults import resolve_model
from xrwatch.engine import InferenceEngine, Prediction
from xrwatch.errors import ConfigError
from xrwatch.flags import SCOPE_GUARD_HELP, SCOPE_GUARDS
from xrwatch.inputs import expand_inputs
from xrwatch.logs import configure_logging
from xrwatch.remote.options import (
    DEFAULT_TRITON_MODEL,
    TRITON_HELP,
    TRITON_MODEL_HELP,
    triton_engine,
)
from xrwatch.serve.reports import csv_cell

logger = logging.getLogger(__name__)


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


CSV_FIELDS = fields.PREDICTION


def common_root(files: Sequence[Path]) -> Path:
    """The deepest folder holding every file: heatmap names are paths relative to it."""
    parents = [str(f.resolve().parent) for f in files]
    return Path(os.path.commonpath(parents)) if parents else Path(".")


def render_json(predictions: Sequence[Prediction]) -> str:
    """A JSON list with one object per file (:meth:`Prediction.to_dict`)."""
    return json.dumps([p.to_dict() for p in predictions], indent=2, ensure_ascii=False)


def csv_header(classes: Sequence[str]) -> list[str]:
    """The CSV columns: the prediction's fields, then a ``p_<class>`` column per class."""
    return [*CSV_FIELDS, *(fields.prob_column(c) for c in classes)]


def csv_rows(predictions: Sequence[Prediction], classes: Sequence[str]) -> str:
    """The CSV lines of ``predictions``, without the header."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for p in predictions:
        d = p.to_dict()
        probs = [csv_cell(p.probabilities.get(c)) for c in classes]
        writer.writerow([csv_cell(d[k]) for k in CSV_FIELDS] + probs)
    return buffer.getvalue()


def render_csv(predictions: Sequence[Prediction], classes: Sequence[str]) -> str:
    """One row per file; a ``p_<class>`` column per class, in the model's class order."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(csv_header(classes))
    return buffer.getvalue() + csv_rows(predictions, classes)


_PAD = 2  # a rich column's width includes its padding (one space each side)


class _Rows:
    """Prints the results batch by batch, as they are classified, in one format: a table
    (the header once, then rows under it in fixed columns), CSV, or a JSON list."""

    def __init__(self, fmt: OutputFormat, classes: Sequence[str], names: Sequence[str]) -> None:
        self.fmt, self.classes, self.first = fmt, list(classes), True
        # Column widths are fixed up front (rows come a batch at a time): the file column
        # fits the longest name given; on a terminal it folds beyond 3/5 of what is left.
        self.label_w = max([5, *(len(c) for c in self.classes)])
        # status, label, confidence, flag; each column's padding (file and reason included)
        # and the dividers between them; then a column per class (padding, divider)
        fixed = 6 + self.label_w + 10 + 14 + _PAD * 6 + 5
        per_class = sum(max(7, len(c)) + _PAD + 1 for c in self.classes)
        longest = max([4, *(len(n) for n in names)])
        self.probs = True
        if console.is_terminal:
            self.out = console
            # a narrow terminal leaves out the per-class probabilities (CSV and JSON keep
            # them) rather than cut every column to an ellipsis
            self.probs = console.width >= fixed + per_class + 40
            fixed += per_class if self.probs else 0
            rest = max(console.width - fixed, 24)
            self.file_w = min(longest, rest * 3 // 5)
        else:  # piped: one file per line stays greppable, whatever its length
            fixed += per_class
            self.file_w = longest
            self.out = Console(width=max(console.width, 200, fixed + longest + 40))
            rest = self.out.width - fixed
        self.reason_w = max(rest - self.file_w, 8)  # what is left: the table fits the width

    def add(self, predictions: Sequence[Prediction]) -> None:
        if not predictions:
            return
        if self.fmt is OutputFormat.json:
            items = ",\n".join(
                textwrap.indent(json.dumps(p.to_dict(), indent=2, ensure_ascii=False), "  ")
                for p in predictions
            )
            _echo(("[\n" if self.first else ",\n") + items)
        elif self.fmt is OutputFormat.csv:
            header = render_csv([], self.classes) if self.first else ""
            _echo(header + csv_rows(predictions, self.classes), nl=False)
        else:
            self.out.print(self._table(predictions))
        self.first = False

    def close(self) -> None:
        if self.fmt is OutputFormat.json:
            _echo("[]" if self.first else "\n]")

    def _table(self, predictions: Sequence[Prediction]) -> Any:
        from rich import box
        from rich.table import Table

        table = Table(show_header=self.first, header_style="bold", box=box.SIMPLE_HEAD,
                      show_edge=False, pad_edge=False, padding=(0, 1))  # fmt: skip
        table.add_column("file", overflow="fold", width=self.file_w + _PAD)
        table.add_column("status", width=6 + _PAD)
        table.add_column("label", width=self.label_w + _PAD)
        table.add_column("confidence", justify="right", width=10 + _PAD)
        table.add_column("flag", width=14 + _PAD)
        shown = self.classes if self.probs else []
        for c in shown:
            table.add_column(escape(c), justify="right", width=max(7, len(c)) + _PAD)
        table.add_column("error / flag reason", overflow="fold", width=self.reason_w + _PAD)
        for p in predictions:
            probs = [f"{p.probabilities[c]:.3f}" if c in p.probabilities else "" for c in shown]
            table.add_row(
                escape(p.file),  # rich would take [brackets] in a file name for markup
                "ok" if p.ok else "[red]error[/]",
                escape(p.label or ""),
                f"{p.confidence:.3f}" if p.confidence is not None else "",
                f"[yellow]{p.flag}[/]" if p.flag else "",
                *probs,
                escape(p.error or p.flag_reason or ""),
            )
        return table


def _echo(text: str, nl: bool = True) -> None:
    typer.echo(text, nl=nl)
    sys.stdout.flush()  # each batch as it is classified, also into a pipe


@app.command("classify")
def classify_command(
    paths: list[Path] = typer.Argument(
        ...,
        help="Files and folders (searched recursively).",
        readable=False,  # an unreadable file is one error row, not a usage error
        show_default=False,
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        "-m",
        help="An ONNX model from `xrwatch export` (default: the model shipped with xrwatch).",
    ),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format."),
    require_gpu: bool = typer.Option(
        False, "--require-gpu", help="Refuse to run unless the CUDA provider works."
    ),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU even when a GPU is present."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per model run."),
    threads: int = typer.Option(
        0, "--threads", min=0, help="ONNX Runtime intra-op threads (0 = all cores)."
    ),
    heatmaps: Path | None = typer.Option(
        None,
        "--heatmaps",
        help="Write a heatmap overlay PNG per classified file under this folder "
        "(<path relative to the inputs>.png; models exported with a cam output).",
    ),
    low_confidence: float | None = typer.Option(
        None,
        "--low-confidence",
        min=0.0,
        max=0.999,
        help="Flag low_confidence below this top probability (default: the model's).",
    ),
    scope_guard: str = typer.Option(
        "combined",
        "--scope-guard",
        help=SCOPE_GUARD_HELP + ".",
    ),
    log_level: str = typer.Option("WARNING", "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
    triton: str | None = typer.Option(None, "--triton", help=TRITON_HELP),
    triton_model: str = typer.Option(
        DEFAULT_TRITON_MODEL, "--triton-model", help=TRITON_MODEL_HELP
    ),
) -> int:
    """Classify X-ray files and folders with an exported model.

    Prints one result per file, as a table, CSV or JSON. A file that cannot be read gets
    status error with its reason and does not stop the rest. Exit 1 if any file failed.
    An ok result may carry a flag: low_confidence, or out_of_scope (the input does not
    look like a frontal chest X-ray); its probabilities are still given.
    """
    configure_logging(log_level)
    if cpu and require_gpu:
        raise ConfigError("--cpu and --require-gpu contradict each other")
    if scope_guard not in SCOPE_GUARDS:
        raise ConfigError(f"--scope-guard must be one of {', '.join(SCOPE_GUARDS)}")
    if triton is not None:  # the model runs on Triton server(s): xrwatch.remote
        engine: InferenceEngine = triton_engine(
            triton,
            triton_model,
            expected_model=model,
            low_confidence=low_confidence,
            scope_guard=scope_guard,
            require_gpu=require_gpu,
        )
    else:
        engine = InferenceEngine(
            resolve_model(model),
            use_gpu=not cpu,
            require_gpu=require_gpu,
            intra_op_threads=threads,
            low_confidence=low_confidence,
            scope_guard=scope_guard,
        )
    files = expand_inputs(paths)
    if not files:
        raise ConfigError(f"no files found under {', '.join(str(p) for p in paths)}")
    if heatmaps is not None and not engine.has_cam:
        logger.warning("%s has no cam output: no heatmaps are written", engine.path)
    rows = _Rows(fmt, engine.classes, [str(f) for f in files])
    root = common_root(files)
    failed = done = 0
    with progress(len(files), "classifying") as advance:
        for start in range(0, len(files), batch_size):
            batch = engine.predict_paths(
                files[start : start + batch_size], batch_size=batch_size, heatmaps=heatmaps,
                root=root,
            )  # fmt: skip
            rows.add(batch)
            advance(len(batch))
            done += len(batch)
            failed += sum(not p.ok for p in batch)
    rows.close()
    logger.info("%d file(s) classified, %d failed, on %s", done, failed, engine.provider)
    return EXIT_FAILED if failed else EXIT_OK
