"""``xrwatch export``: checkpoint → verified ONNX model (+ int8/fp16, model card, Triton)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from xrwatch.cli._app import app, console
from xrwatch.errors import require_extra
from xrwatch.logs import configure_logging

logger = logging.getLogger(__name__)


@app.command("export")
def export_command(
    source: Path = typer.Argument(
        ..., help="A checkpoint (best.pt), a run folder, or with --best a folder of runs."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="The fp32 model file (.onnx)."),
    best: bool = typer.Option(
        False,
        "--best",
        help="Pick the run under SOURCE with the best validation balanced accuracy (ties: "
        "lower validation loss, then path); runs on different data or splits are refused.",
    ),
    verify_images: list[Path] = typer.Option(
        [], "--verify-images", help="Also verify on the images under this folder (repeatable)."
    ),
    int8: bool = typer.Option(False, "--int8", help="Also write <stem>.int8.onnx (static QDQ)."),
    calibration: list[Path] = typer.Option(
        [], "--calibration", help="Images to calibrate int8 on (folder, repeatable)."
    ),
    min_int8_agreement: float = typer.Option(
        0.95, "--min-int8-agreement", help="Fail unless int8 top-1 agrees with fp32 this often."
    ),
    fp16: bool = typer.Option(False, "--fp16", help="Also write <stem>.fp16.onnx (for GPUs)."),
    card: bool = typer.Option(
        True, "--card/--no-card", help="Write the model card <stem>.md (model.md for model.onnx)."
    ),
    triton: Path | None = typer.Option(
        None, "--triton", help="Also add the model to this Triton model repository."
    ),
    triton_name: str = typer.Option("xrwatch", "--triton-name", help="Model name in Triton."),
    triton_precision: str = typer.Option(
        "fp32", "--triton-precision", help="Which exported variant Triton serves."
    ),
    triton_max_batch: int = typer.Option(32, "--triton-max-batch", help="max_batch_size."),
    fit: bool = typer.Option(
        True,
        "--fit/--no-fit",
        help="Fit temperature scaling and the scope guard on the run's splits (RUN/splits).",
    ),
    splits: Path | None = typer.Option(
        None, "--splits", help="Folder with train.csv/val.csv/test.csv (default: RUN/splits)."
    ),
    guard_pass_rate: float = typer.Option(
        0.98, "--guard-pass-rate", help="Share of validation images the scope guard passes."
    ),
    low_confidence: float | None = typer.Option(
        None,
        "--low-confidence",
        help="Flag low_confidence below this calibrated probability (default: the threshold "
        "chosen on the validation split, flagging at most 20 % of its right predictions).",
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
) -> None:
    """Export a checkpoint to a verified ONNX model.

    One self-describing file, verified against torch, plus on request int8/fp16 variants,
    a model card and a Triton model repository. The graph also outputs class activation
    maps (cam); when the run folder has its splits, temperature scaling and the scope guard
    are fitted on them and go into the graph too. Needs the train extra.
    """
    configure_logging(log_level)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    require_extra("train", "torch", "onnx")
    from xrwatch_export.pipeline import ExportOptions, export_model

    result = export_model(
        ExportOptions(
            source=source,
            output=output,
            best=best,
            verify_images=tuple(verify_images),
            int8=int8,
            calibration=tuple(calibration),
            min_int8_agreement=min_int8_agreement,
            fp16=fp16,
            card=card,
            triton=triton,
            triton_name=triton_name,
            triton_precision=triton_precision,
            triton_max_batch=triton_max_batch,
            fit=fit,
            splits=splits,
            guard_pass_rate=guard_pass_rate,
            low_confidence=low_confidence,
        )
    )
    console.print(f"source: {result.selection.path}", highlight=False, markup=False)
    console.print(f"  why: {result.selection.reason}", highlight=False, markup=False)
    for variant in result.variants:
        console.print(f"wrote {variant.path} ({variant.precision})", highlight=False, markup=False)
        console.print(f"  {variant.report.summary()}", highlight=False, markup=False)
    if result.reliability is not None:
        console.print(f"reliability diagram: {result.reliability}", highlight=False, markup=False)
    if result.card is not None:
        console.print(f"model card: {result.card}", highlight=False, markup=False)
    if result.triton is not None:
        console.print(f"Triton model: {result.triton}", highlight=False, markup=False)
