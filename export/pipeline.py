"""Checkpoint → verified ONNX model(s), model card and Triton repository, all or nothing.

Everything is built and verified in a staging folder beside the output; only when every
requested variant has passed are the files moved into place. A failed verification leaves
no model file behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrwatch import modelmeta as mm
from xrwatch.errors import ConfigError
from xrwatch.modelmeta import ModelMeta, file_sha256, read_model_metadata
from xrwatch.preprocess import PreprocessSpec
from xrwatch_training.checkpoint import load_checkpoint
from xrwatch_training.models import model_from_checkpoint

from . import card as model_card
from . import triton as triton_repo
from .calibcheck import CALIBRATION_OUTPUTS, measure_calibration
from .contract import POPULATION_THRESHOLD, contract_metadata, with_temperature
from .explain import CalibratedLogits, ExplainedClassifier, FeatureNet
from .fitting import (
    GUARD_PASS_RATE,
    MIN_CONTRAST,
    Fitted,
    find_splits,
    fit_extras,
)
from .guardtune import GUARD_SCORES, tune_guard
from .onnx_export import OPSET, build_metadata, export_fp32
from .quantize import convert_fp16, quantize_int8
from .sources import Selection, find_best, resolve_source
from .verify import (
    FP32_TOLERANCE,
    InputSet,
    VerifyReport,
    check_onnx,
    check_split,
    collect_images,
    compare,
    compare_extras,
    concat,
    file_outputs,
    onnx_probabilities,
    random_inputs,
    require,
    torch_probabilities,
)

logger = logging.getLogger(__name__)

FP16_TOLERANCE = 1e-2  # max |Δp| of fp16 vs fp32 (half precision keeps ~3 decimal digits)
INT8_MIN_AGREEMENT = 0.95  # default minimum top-1 agreement of int8 with fp32
MAX_CALIBRATION_IMAGES = 256
PRECISIONS = ("fp32", "int8", "fp16")


@dataclass(frozen=True)
class ExportOptions:
    """What ``xrwatch export`` was asked to do (see its ``--help``)."""

    source: Path  # checkpoint, run folder, or (with best) a folder of runs
    output: Path  # the fp32 model; variants go beside it as <stem>.int8.onnx, <stem>.fp16.onnx
    best: bool = False
    verify_images: tuple[Path, ...] = ()
    int8: bool = False
    calibration: tuple[Path, ...] = ()
    fp16: bool = False
    card: bool = True
    triton: Path | None = None
    triton_name: str = "xrwatch"
    triton_precision: str = "fp32"
    triton_max_batch: int = triton_repo.DEFAULT_MAX_BATCH
    tolerance: float = FP32_TOLERANCE
    min_int8_agreement: float = INT8_MIN_AGREEMENT
    max_calibration_images: int = MAX_CALIBRATION_IMAGES
    opset: int = OPSET
    fit: bool = True  # temperature + scope guard from the run's splits, when it has them
    splits: Path | None = None  # folder with train/val/test.csv; default RUN/splits
    guard_pass_rate: float = GUARD_PASS_RATE
    min_contrast: float = MIN_CONTRAST
    low_confidence: float | None = None  # None: chosen on the validation split
    temperature: float | None = None  # ship this temperature instead of the fitted one
    temperature_reason: str = ""  # why (recorded in xrwatch.calibration)
    population_threshold: float = POPULATION_THRESHOLD  # for a checkpoint with a gate
    guard_combine: str = "both"  # features and layout: "both" must exceed, or "either"

    def validate(self) -> None:
        if self.output.suffix != ".onnx":
            raise ConfigError(f"{self.output}: the output file name must end in .onnx")
        if self.opset < 17:
            raise ConfigError(f"opset must be >= 17, got {self.opset}")
        if self.int8 and not self.calibration:
            raise ConfigError("--int8 needs --calibration DIR (images to calibrate on)")
        if self.calibration and not self.int8:
            raise ConfigError("--calibration is only used with --int8")
        for folder in (*self.verify_images, *self.calibration):
            if not folder.exists():
                raise ConfigError(f"{folder}: no such file or folder")
        wanted = {"fp32", *(["int8"] if self.int8 else []), *(["fp16"] if self.fp16 else [])}
        if self.triton is not None and self.triton_precision not in wanted:
            raise ConfigError(
                f"--triton-precision {self.triton_precision} needs that variant to be exported "
                f"(exporting {', '.join(sorted(wanted))})"
            )
        if not 0.0 <= self.min_int8_agreement <= 1.0:
            raise ConfigError("--min-int8-agreement must be in [0, 1]")
        if not 0.5 <= self.guard_pass_rate <= 1.0:
            raise ConfigError("--guard-pass-rate must be in [0.5, 1]")
        if self.low_confidence is not None and not 0.0 <= self.low_confidence < 1.0:
            raise ConfigError("--low-confidence must be in [0, 1)")
        if self.guard_combine not in ("both", "either"):
            raise ConfigError(f"guard combine must be both or either, got {self.guard_combine!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.population_threshold < 1.0:
            raise ConfigError("the population threshold must be in (0, 1)")
        if self.splits is not None and not self.splits.is_dir():
            raise ConfigError(f"{self.splits}: no such splits folder")


@dataclass(frozen=True)
class ExportedVariant:
    precision: str
    path: Path
    sha256: str
    report: VerifyReport


@dataclass(frozen=True)
class ExportResult:
    selection: Selection
    checkpoint_sha256: str
    variants: tuple[ExportedVariant, ...]
    meta: ModelMeta  # of the fp32 model, as serving reads it
    card: Path | None = None
    triton: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    reliability: Path | None = None  # the reliability diagram in the run folder

    def variant(self, precision: str) -> ExportedVariant:
        for v in self.variants:
            if v.precision == precision:
                return v
        raise KeyError(precision)


def variant_path(output: Path, precision: str) -> Path:
    """``model.onnx`` for fp32, ``model.int8.onnx`` / ``model.fp16.onnx`` for the others."""
    return output if precision == "fp32" else output.with_name(f"{output.stem}.{precision}.onnx")


def require_completed_epoch(ckpt: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint saved before its first epoch finished (a run interrupted early).

    Its weights are the initial ones and it has no validation metrics: exported, it would
    pass verification (ONNX matches torch) and be served as if it were a trained model.
    """
    epoch = int(ckpt.get("epoch") or 0)
    val = (ckpt.get("metrics") or {}).get("val")
    if epoch >= 1 and val:
        return
    found = f"epoch {epoch}" + ("" if val else ", no validation metrics")
    raise ConfigError(
        f"{path}: no completed training epoch ({found}): the run was interrupted before "
        "its first epoch finished, so this model is untrained and unmeasured. Finish at least "
        "one epoch (xrwatch train --resume RUN_FOLDER) and export again"
    )


def export_model(options: ExportOptions) -> ExportResult:
    """Run the whole export; raises an :class:`~xrwatch.errors.XRWatchError` on failure."""
    options.validate()
    selection = find_best(options.source) if options.best else resolve_source(options.source)
    logger.info("exporting %s (%s)", selection.path, selection.reason)
    ckpt = load_checkpoint(selection.path)
    require_completed_epoch(ckpt, selection.path)
    checkpoint_sha256 = file_sha256(selection.path)
    model = model_from_checkpoint(ckpt)
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    net = FeatureNet(model, n_classes=len(ckpt["classes"])).eval()
    fitted = _fit(options, selection.path, net, spec, tuple(ckpt["classes"]))
    if fitted is not None and options.temperature is not None:
        fitted = with_temperature(fitted, options.temperature, options.temperature_reason)
    explained = ExplainedClassifier(
        net,
        temperature=fitted.temperature if fitted else 1.0,
        guard=fitted.guard if fitted else None,
    ).eval()

    inputs = random_inputs(spec.size)
    if options.verify_images:
        inputs = concat(inputs, collect_images(options.verify_images, spec))
    check_split(model, net, inputs.arrays)
    reference = torch_probabilities(CalibratedLogits(explained), inputs.arrays)
    metadata = build_metadata(ckpt, checkpoint_sha256=checkpoint_sha256, precision="fp32")
    metadata.update(_extra_metadata(explained, spec.size, len(ckpt["classes"]), fitted))
    metadata.update(contract_metadata(ckpt, options.population_threshold))

    options.output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".xrwatch-export-", dir=options.output.parent))
    try:
        staged: list[tuple[str, Path, VerifyReport]] = []
        fp32 = staging / options.output.name
        export_fp32(explained, size=spec.size, path=fp32, metadata=metadata, opset=options.opset)
        check_onnx(fp32)
        compare_extras(explained, fp32, inputs.arrays)
        fp32_probs = onnx_probabilities(fp32, inputs.arrays)
        report = compare(
            fp32_probs,
            reference,
            inputs,
            precision="fp32",
            reference_name="torch",
            tolerance=options.tolerance,
            min_agreement=1.0,
        )
        staged.append(("fp32", fp32, require(report, options.output)))

        if options.int8:
            staged.append(_int8(options, spec, fp32, inputs, fp32_probs, staging))
        if options.fp16:
            staged.append(_fp16(options, fp32, inputs, fp32_probs, staging))
        if fitted is not None:  # threshold and ECE on each file's own outputs (int8 moves them)
            splits = {name: inputs for name, inputs, _ in fitted.labelled_splits()}
            labels = {name: truth for name, _, truth in fitted.labelled_splits()}
            for precision, path, _ in staged:
                outputs = file_outputs(path, splits, (*GUARD_SCORES, *CALIBRATION_OUTPUTS))
                tune_guard(path, outputs, precision=precision)
                measure_calibration(path, outputs, labels, precision=precision)
        for _, path, _ in staged:
            read_model_metadata(path)  # the serving side's own reader must accept it

        variants = []
        for precision, path, rep in staged:
            final = variant_path(options.output, precision)
            os.replace(path, final)
            variants.append(ExportedVariant(precision, final, file_sha256(final), rep))
            logger.info("wrote %s (%s, sha256 %s)", final, precision, variants[-1].sha256)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    meta = read_model_metadata(options.output)
    card_path = None
    if options.card:
        card_path = model_card.write_card(
            options.output.with_name("model.md")
            if options.output.name == "model.onnx"
            else options.output.with_suffix(".md"),
            model_card.render_card(
                meta,
                variants=[(v.path.name, v.precision, v.sha256) for v in variants],
                checkpoint=str(selection.path),
                selection=selection.reason,
                config=ckpt.get("config") or {},
                verification=[v.report.summary() for v in variants],
            ),
        )
    triton_dir = None
    if options.triton is not None:
        chosen = next(v for v in variants if v.precision == options.triton_precision)
        triton_dir = triton_repo.write_repository(
            options.triton,
            chosen.path,
            read_model_metadata(chosen.path),
            name=options.triton_name,
            max_batch_size=options.triton_max_batch,
        )
    return ExportResult(
        selection=selection,
        checkpoint_sha256=checkpoint_sha256,
        variants=tuple(variants),
        meta=meta,
        card=card_path,
        triton=triton_dir,
        reliability=fitted.reliability_png if fitted else None,
    )


def _fit(
    options: ExportOptions,
    checkpoint: Path,
    net: FeatureNet,
    spec: PreprocessSpec,
    classes: tuple[str, ...],
) -> Fitted | None:
    """Temperature and guard from the run's splits; None (with one log line) without them."""
    if not options.fit:
        logger.info("--no-fit: exporting without calibration and scope guard")
        return None
    splits = find_splits(checkpoint, options.splits)
    if splits is None:
        logger.warning(
            "%s: no splits/train.csv and val.csv beside the checkpoint (pass --splits): "
            "exporting without calibration and scope guard (no low_confidence or "
            "out_of_scope flags)",
            checkpoint.parent,
        )
        return None
    return fit_extras(
        net,
        spec,
        classes,
        splits,
        run_dir=checkpoint.parent,
        guard_pass_rate=options.guard_pass_rate,
        min_contrast=options.min_contrast,
        low_confidence=options.low_confidence,
        guard_combine=options.guard_combine,
    )


def _extra_metadata(
    explained: ExplainedClassifier, size: int, n_classes: int, fitted: Fitted | None
) -> dict[str, str]:
    """The optional ``xrwatch.cam`` / ``calibration`` / ``guard`` metadata strings."""
    import json

    import torch

    with torch.no_grad():
        cam = explained(torch.zeros(1, 1, size, size))[2]
    out = {
        mm.KEY_CAM: json.dumps(
            {
                "output": "cam",
                "method": "CAM (Zhou et al. 2016): last feature map weighted by the head",
                "layer": explained.net.layer_name,
                "shape": [n_classes, int(cam.shape[2]), int(cam.shape[3])],
            }
        )
    }
    if fitted is not None:
        out[mm.KEY_CALIBRATION] = json.dumps(fitted.calibration_meta, sort_keys=True)
        out[mm.KEY_GUARD] = json.dumps(fitted.guard_meta, sort_keys=True)
    return out


def _int8(
    options: ExportOptions,
    spec: PreprocessSpec,
    fp32: Path,
    inputs: InputSet,
    fp32_probs: np.ndarray,
    staging: Path,
) -> tuple[str, Path, VerifyReport]:
    calibration = collect_images(options.calibration, spec, limit=options.max_calibration_images)
    path = staging / variant_path(options.output, "int8").name
    quantize_int8(fp32, path, calibration.arrays)
    check_onnx(path)
    # agreement on the verification images plus the calibration images not among them
    seen = set(inputs.names)
    extra = [i for i, name in enumerate(calibration.names) if name not in seen]
    checked, reference = inputs, fp32_probs
    if extra:
        more = InputSet(calibration.arrays[extra], tuple(calibration.names[i] for i in extra))
        checked = concat(inputs, more)
        reference = np.concatenate([fp32_probs, onnx_probabilities(fp32, more.arrays)])
    report = compare(
        onnx_probabilities(path, checked.arrays),
        reference,
        checked,
        precision="int8",
        reference_name="fp32 onnx",
        tolerance=1.0,  # probabilities may move; agreement is the criterion
        min_agreement=options.min_int8_agreement,
    )
    hint = (
        f" (required top-1 agreement {options.min_int8_agreement:.0%}: "
        "--min-int8-agreement; more or more representative --calibration images may help)"
    )
    return "int8", path, require(report, variant_path(options.output, "int8"), hint)


def _fp16(
    options: ExportOptions,
    fp32: Path,
    inputs: InputSet,
    fp32_probs: np.ndarray,
    staging: Path,
) -> tuple[str, Path, VerifyReport]:
    path = staging / variant_path(options.output, "fp16").name
    convert_fp16(fp32, path)
    check_onnx(path)
    report = compare(
        onnx_probabilities(path, inputs.arrays),
        fp32_probs,
        inputs,
        precision="fp16",
        reference_name="fp32 onnx",
        tolerance=FP16_TOLERANCE,
        min_agreement=0.0,  # near-ties may flip; the probability bound is the criterion
    )
    return "fp16", path, require(report, variant_path(options.output, "fp16"))
