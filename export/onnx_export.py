"""Tracing a checkpoint's model into one ONNX file and stamping xrwatch's metadata into it.

The graph takes ``image`` (float32 N x 1 x H x W in [0, 1]; N dynamic) and returns
``logits`` and ``probabilities`` (float32 N x C), plus ``cam``, ``ood_score`` and
``contrast`` when the module is an :class:`export.explain.ExplainedClassifier`. Channel
replication and normalisation are part of the traced module
(:class:`training.models.NormalizedClassifier`), so they are part of the graph. We use the
torch.export-based exporter (``dynamo=True``, the default since torch 2.9): it folds
BatchNorm into the convolutions and emits a clean opset-18 graph; the weights are embedded
(no external data file).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from xrwatch import __version__
from xrwatch import modelmeta as mm
from xrwatch.preprocess import PreprocessSpec
from xrwatch_training.presets import config_sha256

logger = logging.getLogger(__name__)

OPSET = 18  # >= 17 (LayerNorm etc.); 18 is what the torch.export exporter targets natively
MAX_IR_VERSION = 10  # ONNX Runtime >= 1.18 reads IR 10; newer onnx packages default higher
MAX_BATCH = 4096  # upper bound of the dynamic batch axis (torch.export needs one)


class WithProbabilities(nn.Module):
    """``model`` returning ``(logits, softmax(logits))``; the module that is exported."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, torch.softmax(logits, dim=1)


def build_metadata(
    ckpt: dict[str, Any], *, checkpoint_sha256: str, precision: str
) -> dict[str, str]:
    """The ``xrwatch.*`` metadata strings (DEVELOPERS.md) for a model exported from ``ckpt``."""
    metrics = ckpt.get("metrics") or {}
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    return {
        mm.KEY_FORMAT_VERSION: mm.FORMAT_VERSION,
        mm.KEY_CLASSES: json.dumps(list(ckpt["classes"])),
        mm.KEY_PREPROCESS: spec.to_json(),
        mm.KEY_ARCH: str(ckpt["arch"]),
        mm.KEY_EXPERIMENT: str(ckpt["experiment"]),
        mm.KEY_TASK: str(ckpt["task"]),
        mm.KEY_PRECISION: precision,
        mm.KEY_CONFIG_SHA256: config_sha256(ckpt.get("config", {})),
        mm.KEY_METRICS: json.dumps(
            {"val": metrics.get("val"), "test": metrics.get("test")}, sort_keys=True, default=float
        ),
        mm.KEY_CHECKPOINT_SHA256: checkpoint_sha256,
        mm.KEY_VERSION: __version__,
        mm.KEY_CREATED_AT: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        # export verifies at this level (export.verify.onnx_probabilities); serving uses it
        mm.KEY_GRAPH_OPTIMIZATION: mm.DEFAULT_GRAPH_OPTIMIZATION,
    }


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace the model's ``xrwatch.*`` metadata_props with ``props`` (others are kept)."""
    keep = [p for p in model.metadata_props if not p.key.startswith("xrwatch.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in sorted(props.items()):
        model.metadata_props.add(key=key, value=value)


def xrwatch_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's ``xrwatch.*`` metadata_props."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("xrwatch.")}


def set_json_metadata(model: onnx.ModelProto, key: str, value: Any) -> None:
    """Set the ``xrwatch.*`` JSON metadata ``key`` to ``value``, keeping the other keys."""
    set_metadata(model, {**xrwatch_metadata(model), key: json.dumps(value, sort_keys=True)})


def save_single_file(model: onnx.ModelProto, path: Path) -> None:
    """Save with every tensor embedded and an IR version ONNX Runtime reads."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.save_model(model, str(path), save_as_external_data=False)


def export_fp32(
    model: nn.Module, *, size: int, path: Path, metadata: dict[str, str], opset: int = OPSET
) -> None:
    """Export eval-mode ``model`` to ``path`` with ``metadata``.

    ``model`` maps N x 1 x size x size to logits (exported with softmax probabilities), or is
    an :class:`export.explain.ExplainedClassifier`, exported with all its outputs.
    """
    from .explain import ExplainedClassifier

    wrapped: nn.Module
    if isinstance(model, ExplainedClassifier):
        wrapped, output_names = model.eval(), list(model.output_names)
    else:
        wrapped, output_names = WithProbabilities(model).eval(), ["logits", "probabilities"]
    example = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's FutureWarnings are not ours to fix
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=output_names,
            dynamic_shapes={"image": {0: batch}},
            opset_version=opset,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    if program is None:  # pragma: no cover - only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    set_metadata(proto, metadata)
    proto.doc_string = (
        f"xrwatch {metadata[mm.KEY_ARCH]} ({metadata[mm.KEY_EXPERIMENT]}), classes "
        f"{metadata[mm.KEY_CLASSES]}. Research use only - not a medical device."
    )
    save_single_file(proto, path)
    logger.info("exported %s (opset %d, %d nodes)", path.name, opset, len(proto.graph.node))
