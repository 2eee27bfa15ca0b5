"""``xrwatch classify``: classify files and folders with an exported model, no daemon."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from xrwatch import fields
from xrwatch.cli._app import EXIT_FAILED, EXIT_OK, app, console
from xrwatch.defaults import resolve_model
from xrwatch.engine import InferenceEngine, Prediction
from xrwatch.errors import ConfigError
from xrwatch.flags import SCOPE_GUARD_HELP, SCOPE_GUARDS
from xrwatch.inputs import expand_inputs
from xrwatch.logs import configure_logging
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


def render_csv(predictions: Sequence[Prediction], classes: Sequence[str]) -> str:
    """One row per file; a ``p_<class>`` column per class, in the model's class order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CSV_FIELDS, *(fields.prob_column(c) for c in classes)])
    for p in predictions:
        d = p.to_dict()
        probs = [csv_cell(p.probabilities.get(c)) for c in classes]
        writer.writerow([csv_cell(d[k]) for k in CSV_FIELDS] + probs)
    return buffer.getvalue()


def _print_table(predictions: Sequence[Prediction], classes: Sequence[str]) -> None:
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    table.add_column("file", overflow="fold", ratio=3)
    table.add_column("status")
    table.add_column("label")
    table.add_column("confidence", justify="right")
    table.add_column("flag")
    for c in classes:
        table.add_column(escape(c), justify="right")
    table.add_column("error / flag reason", overflow="fold")
    for p in predictions:
        probs = [f"{p.probabilities[c]:.3f}" if c in p.probabilities else "" for c in classes]
        table.add_row(
            escape(p.file),  # rich would take [brackets] in a file name for markup
            "ok" if p.ok else "[red]error[/]",
            escape(p.label or ""),
            f"{p.confidence:.3f}" if p.confidence is not None else "",
            f"[yellow]{p.flag}[/]" if p.flag else "",
            *probs,
            escape(p.error or p.flag_reason or ""),
        )
    # piped output is not wrapped to 80 columns: one file per line stays greppable
    out = console if console.is_terminal else Console(width=max(console.width, 200))
    out.print(table)


@app.command("classify")
def classify_command(
    paths: list[Path] = typer.Argument(..., help="Files and folders (searched recursively)."),
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
    predictions = engine.predict_paths(
        files, batch_size=batch_size, heatmaps=heatmaps, root=common_root(files)
    )
    if fmt is OutputFormat.json:
        typer.echo(render_json(predictions))
    elif fmt is OutputFormat.csv:
        typer.echo(render_csv(predictions, engine.classes), nl=False)
    else:
        _print_table(predictions, engine.classes)
    failed = sum(not p.ok for p in predictions)
    logger.info(
        "%d file(s) classified, %d failed, on %s", len(predictions), failed, engine.provider
    )
    return EXIT_FAILED if failed else EXIT_OK
