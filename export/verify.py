"""Proving an exported model computes what the checkpoint's torch model computes.

Always run at export: ``onnx.checker`` (full check, with shape inference), then ONNX Runtime
against torch on a seeded random batch and on real images read through
:func:`xrwatch.preprocess.load_model_input`. fp32 must match within ``1e-4`` in probability
with identical argmax; fp16 and int8 variants are compared with the fp32 model with
tolerances that fit them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from xrwatch.errors import ImageError, ModelError
from xrwatch.inputs import expand_inputs
from xrwatch.modelmeta import (
    DEFAULT_GRAPH_OPTIMIZATION,
    ort_optimization_level,
    read_model_metadata,
)
from xrwatch.preprocess import PreprocessSpec, load_model_input

logger = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4  # max |p_onnx - p_torch| per class
RANDOM_BATCH = 6  # random inputs checked besides the real images
RUN_BATCH = 16  # images per forward pass while verifying


class ExportVerificationError(ModelError):
    """The exported model does not compute what it should; no model file is kept."""


@dataclass(frozen=True)
class InputSet:
    """Model inputs for verification: an N x 1 x S x S array and a label for each row."""

    arrays: np.ndarray
    names: tuple[str, ...]
    n_random: int = 0

    @property
    def n_images(self) -> int:
        return len(self.names) - self.n_random


@dataclass(frozen=True)
class VerifyReport:
    """What a verification compared and found."""

    precision: str
    reference: str  # "torch" or "fp32 onnx"
    n_random: int
    n_images: int
    max_abs_diff: float  # largest per-class probability difference
    argmax_agreement: float  # fraction of inputs with the same top-1 class
    image_agreement: float | None  # same, on the real images only
    tolerance: float
    passed: bool
    mismatches: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        agree = f"top-1 agreement {self.argmax_agreement:.1%}"
        if self.image_agreement is not None:
            agree += f" ({self.image_agreement:.1%} on {self.n_images} images)"
        return (
            f"{self.precision} vs {self.reference}: {self.n_random} random + {self.n_images} "
            f"image inputs, max |Δp| {self.max_abs_diff:.2e} (tolerance {self.tolerance:g}), "
            f"{agree}"
        )


def collect_images(
    folders: Sequence[Path], spec: PreprocessSpec, *, limit: int | None = None
) -> InputSet:
    """Every readable image under ``folders`` (recursively) as model inputs.

    Unreadable files are skipped with a warning; no readable image at all is an error.
    """
    arrays: list[np.ndarray] = []
    names: list[str] = []
    files = expand_inputs(list(folders))
    for path in files:
        if limit is not None and len(arrays) >= limit:
            break
        try:
            pixels, _ = load_model_input(path, spec)
        except (ImageError, OSError) as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        arrays.append(pixels[None])
        names.append(str(path))
    if not arrays:
        where = ", ".join(str(f) for f in folders)
        raise ModelError(f"{where}: no readable images found ({len(files)} files tried)")
    return InputSet(np.stack(arrays).astype(np.float32), tuple(names))


def random_inputs(size: int, n: int = RANDOM_BATCH, seed: int = 0) -> InputSet:
    """Seeded inputs covering [0, 1]: uniform noise, plus an all-black and an all-white one."""
    rng = np.random.default_rng(seed)
    arrays = rng.random((n, 1, size, size), dtype=np.float32)
    arrays[0] = 0.0
    arrays[1] = 1.0
    return InputSet(arrays, tuple(f"random[{i}]" for i in range(n)), n_random=n)


def concat(*sets: InputSet) -> InputSet:
    present = [s for s in sets if len(s.names)]
    return InputSet(
        np.concatenate([s.arrays for s in present]),
        tuple(n for s in present for n in s.names),
        sum(s.n_random for s in present),
    )


def check_onnx(path: Path) -> None:
    """``onnx.checker`` with full shape inference; raises :class:`ExportVerificationError`."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportVerificationError(f"{path}: onnx.checker rejected the model: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    if any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    ):  # pragma: no cover - we always save embedded
        raise ExportVerificationError(f"{path}: model refers to external data files")


def torch_probabilities(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs), RUN_BATCH):
            logits = model(torch.from_numpy(inputs[start : start + RUN_BATCH]))
            out.append(torch.softmax(logits.float(), dim=1).numpy())
    return np.concatenate(out)


CAM_TOLERANCE = 1e-3  # max |cam_onnx - cam_torch| relative to the largest |cam_torch|
SPLIT_TOLERANCE = 1e-4  # max |logit| difference of the split model vs the checkpoint's


def check_split(model: nn.Module, net: nn.Module, inputs: np.ndarray) -> None:
    """The model split at its feature map (:class:`export.explain.FeatureNet`) must compute
    the checkpoint model's logits; raises :class:`ExportVerificationError` otherwise."""
    x = torch.from_numpy(inputs[:RUN_BATCH])
    with torch.no_grad():
        expected = model(x)
        pooled, got, _ = net(x)
        all_logits = getattr(net, "all_logits", None)
        if all_logits is not None:  # a head with population units: check them too
            got = all_logits(pooled)
    scale = max(1.0, float(expected.abs().max()))
    diff = float((expected - got).abs().max()) / scale
    if not diff <= SPLIT_TOLERANCE:
        raise ExportVerificationError(
            f"the model split at its last feature map computes other logits than the "
            f"checkpoint's model (relative difference {diff:.2e} > {SPLIT_TOLERANCE:g})"
        )


def compare_extras(explained: nn.Module, path: Path, inputs: np.ndarray) -> None:
    """``cam`` (and ``ood_score``, ``contrast``) of the ONNX model at ``path`` against torch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()][2:]
    x = inputs[:RUN_BATCH]
    got = session.run(names, {"image": x})
    with torch.no_grad():
        expected = [t.numpy() for t in explained(torch.from_numpy(x))[2:]]
    for name, g, e in zip(names, got, expected, strict=True):
        scale = max(float(np.abs(e).max()), 1e-6)
        diff = float(np.abs(g - e).max()) / scale
        if not diff <= CAM_TOLERANCE:
            raise ExportVerificationError(
                f"{path}: output {name!r} differs from torch by {diff:.2e} (relative; "
                f"tolerance {CAM_TOLERANCE:g})"
            )
        logger.info("verified %s: output %s within %.1e of torch", path.name, name, diff)


def onnx_probabilities(
    path: Path, inputs: np.ndarray, level: str = DEFAULT_GRAPH_OPTIMIZATION
) -> np.ndarray:
    """Probabilities from ONNX Runtime (CPU) at graph-optimisation ``level``: the level the
    metadata records and serving uses (:mod:`xrwatch.modelmeta`)."""
    return run_outputs(path, inputs, level, ["probabilities"])[0].astype(np.float32)


def compare(
    candidate: np.ndarray,
    reference: np.ndarray,
    inputs: InputSet,
    *,
    precision: str,
    reference_name: str,
    tolerance: float,
    min_agreement: float,
) -> VerifyReport:
    """Compare probability arrays; pass = within ``tolerance`` and agreement ≥ ``min_agreement``."""
    if candidate.shape != reference.shape:
        raise ExportVerificationError(
            f"{precision} output shape {candidate.shape} != reference {reference.shape}"
        )
    diff = np.abs(candidate - reference)
    same = candidate.argmax(1) == reference.argmax(1)
    images = same[inputs.n_random :] if inputs.n_images else None
    finite = bool(np.isfinite(candidate).all())
    max_diff = float(diff.max()) if finite else float("inf")
    agreement = float(same.mean())
    passed = finite and max_diff <= tolerance and agreement >= min_agreement
    mismatches = tuple(
        f"{name}: Δp {d:.2e}, top-1 {'same' if s else 'differs'}"
        for name, d, s in zip(inputs.names, diff.max(1), same, strict=True)
        if d > tolerance or not s
    )
    return VerifyReport(
        precision=precision,
        reference=reference_name,
        n_random=inputs.n_random,
        n_images=inputs.n_images,
        max_abs_diff=max_diff,
        argmax_agreement=agreement,
        image_agreement=float(images.mean()) if images is not None else None,
        tolerance=tolerance,
        passed=passed,
        mismatches=mismatches,
    )


def require(report: VerifyReport, path: Path, hint: str = "") -> VerifyReport:
    """Log ``report``; raise :class:`ExportVerificationError` naming ``path`` unless it passed."""
    if report.passed:
        logger.info("verified %s: %s", path.name, report.summary())
        return report
    shown = "; ".join(report.mismatches[:5])
    more = f" (+{len(report.mismatches) - 5} more)" if len(report.mismatches) > 5 else ""
    raise ExportVerificationError(
        f"{path}: verification failed - {report.summary()}; {shown}{more}{hint}"
    )


def _cpu_session(path: Path, level: str) -> Any:
    """An ONNX Runtime CPU session of ``path`` at graph-optimisation ``level`` (as serving
    runs the file); :class:`ExportVerificationError` naming ``path`` when it cannot load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort_optimization_level(level)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportVerificationError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc


def _run(session: Any, arrays: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """Each of the outputs ``names`` of ``arrays`` (float64), run ``RUN_BATCH`` at a time."""
    parts = [
        session.run(list(names), {"image": arrays[start : start + RUN_BATCH]})
        for start in range(0, len(arrays), RUN_BATCH)
    ]
    return [np.concatenate(column).astype(np.float64) for column in zip(*parts, strict=True)]


def run_outputs(path: Path, arrays: np.ndarray, level: str, names: list[str]) -> np.ndarray:
    """The outputs ``names`` of ``arrays`` by ONNX Runtime on the CPU at graph-optimisation
    ``level`` (as serving runs the file), stacked: one row per name (float64). Raises
    :class:`ExportVerificationError` naming ``path`` when ONNX Runtime cannot load it."""
    return np.stack(_run(_cpu_session(path, level), arrays, names))


def file_outputs(
    path: Path, splits: Mapping[str, np.ndarray | None], names: Sequence[str]
) -> dict[str, dict[str, np.ndarray]]:
    """What the file at ``path`` outputs on each split's inputs: ``split -> output name ->
    values`` (float64), for those of ``names`` the graph has. One ONNX Runtime CPU session
    at the graph-optimisation level the file's metadata records (as serving runs it); each
    split run once, so the guard's tuning and the calibration figures share one pass.
    Splits that are None or empty are left out."""
    session = _cpu_session(path, read_model_metadata(path).graph_optimization)
    graph = {o.name for o in session.get_outputs()}
    present = [n for n in names if n in graph]
    return {
        split: dict(zip(present, _run(session, arrays, present), strict=True))
        for split, arrays in splits.items()
        if arrays is not None and len(arrays)
    }
