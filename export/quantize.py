"""Faster variants of a verified fp32 model: int8 (static QDQ) and fp16.

int8: ONNX Runtime's static quantization in QDQ format, weights per-channel symmetric
int8, activations uint8 calibrated (MinMax) on real images read through the same
preprocessing as serving (:func:`xrwatch.preprocess.load_model_input`). The softmax stays
in float so probabilities keep their resolution. The graph is first run through
``quant_pre_process`` (shape inference + ORT graph optimisation), which folds what can
be folded before quantization.

fp16: weights and activations in float16 with float32 ``image`` input and float32 outputs
(``keep_io_types``), so the serving contract does not change. Meant for GPUs; on a CPU it
runs (ONNX Runtime inserts casts) but is not faster.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from xrwatch import modelmeta as mm
from xrwatch.engine import GUARD_OUTPUTS, LAYOUT_OUTPUTS

from .onnx_export import save_single_file, set_metadata, xrwatch_metadata

logger = logging.getLogger(__name__)

CALIBRATION_BATCH = 8  # images per calibration forward pass


def _restamp(model: onnx.ModelProto, props: dict[str, str], precision: str) -> None:
    set_metadata(model, {**props, mm.KEY_PRECISION: precision})


def quantize_int8(
    fp32_path: Path, out_path: Path, calibration: np.ndarray, *, rewrite_batchnorm: bool = True
) -> None:
    """Write the int8 QDQ version of ``fp32_path`` calibrated on ``calibration`` (N x 1 x S x S).

    ``rewrite_batchnorm=False`` leaves unfoldable BatchNorms as float islands (for comparison
    in the benchmark; see :func:`batchnorm_to_depthwise_conv`).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._starts = iter(range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._starts, None)
            if start is None:
                return None
            return {"image": calibration[start : start + CALIBRATION_BATCH]}

    source = onnx.load(str(fp32_path))
    props = xrwatch_metadata(source)
    softmax = [n.name for n in source.graph.node if n.op_type == "Softmax"]
    guard = _guard_only_nodes(source)  # distances and statistics stay float
    if guard:
        logger.info("int8: %d scope-guard node(s) kept in float", len(guard))
    converted = batchnorm_to_depthwise_conv(source) if rewrite_batchnorm else 0
    if converted:
        logger.info("int8: %d unfoldable BatchNorm(s) rewritten as depthwise 1x1 Conv", converted)
    with tempfile.TemporaryDirectory(prefix="xrwatch-int8-") as tmp:
        rewritten = Path(tmp) / "rewritten.onnx"
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "int8.onnx"
        onnx.save_model(source, str(rewritten))
        quant_pre_process(str(rewritten), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=softmax + guard,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        model = onnx.load(str(quantized))
    _restamp(model, props, "int8")
    save_single_file(model, out_path)
    logger.info("quantized %s to int8 with %d calibration images", fp32_path.name, len(calibration))


def _guard_only_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute only the guard outputs (not logits, probabilities,
    cam): quantizing a Mahalanobis distance to 8 bits would move it across its threshold."""
    producer = {out: node for node in model.graph.node for out in node.output}

    def ancestors(outputs: list[str]) -> set[str]:
        seen: set[str] = set()
        stack = [producer[o] for o in outputs if o in producer]
        while stack:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(producer[i] for i in node.input if i in producer)
        return seen

    names = [o.name for o in model.graph.output]
    only = GUARD_OUTPUTS + LAYOUT_OUTPUTS
    guard = ancestors([n for n in names if n in only])
    return sorted(guard - ancestors([n for n in names if n not in only]))


def batchnorm_to_depthwise_conv(model: onnx.ModelProto) -> int:
    """Rewrite inference-mode BatchNormalization nodes as depthwise 1x1 Convs, in place.

    The exporter folds every BatchNorm that directly follows a Conv. DenseNet's
    pre-activation BatchNorms (Concat → BN → ReLU → Conv) cannot be folded, and ONNX
    Runtime has no quantized BatchNorm: each would stay a float island wrapped in
    Dequantize/Quantize and NHWC↔NCHW Transposes. ``BN(x) = x * s + b`` per channel is
    exactly a grouped 1x1 Conv with weight ``s`` and bias ``b``, which quantizes to a
    QLinearConv (per-channel weights make ``s`` exact). Returns how many were rewritten.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization" or len(node.output) != 1:
            continue
        if not all(name in inits for name in node.input[1:5]):
            continue
        gamma, beta, mean, var = (
            numpy_helper.to_array(inits[name]).astype(np.float64) for name in node.input[1:5]
        )
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        bias = beta - mean * scale
        channels = scale.shape[0]
        w_name, b_name = f"{node.name}_dw_weight", f"{node.name}_dw_bias"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(
                    scale.astype(np.float32).reshape(channels, 1, 1, 1), w_name
                ),
                numpy_helper.from_array(bias.astype(np.float32), b_name),
            ]
        )
        conv = helper.make_node(
            "Conv",
            [node.input[0], w_name, b_name],
            list(node.output),
            name=f"{node.name}_as_dwconv",
            group=channels,
            kernel_shape=[1, 1],
        )
        model.graph.node[index].CopyFrom(conv)
        count += 1
    if count:  # drop the BatchNorm parameters nothing uses any more
        used = {name for n in model.graph.node for name in n.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return count


def convert_fp16(fp32_path: Path, out_path: Path) -> None:
    """Write the float16 version of ``fp32_path`` (float32 input and outputs kept)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    source = onnx.load(str(fp32_path))
    props = xrwatch_metadata(source)
    model = convert_float_to_float16(source, keep_io_types=True, disable_shape_infer=False)
    _sort_topologically(model.graph)  # the converter appends its input Casts at the end
    _restamp(model, props, "fp16")
    save_single_file(model, out_path)
    logger.info("converted %s to fp16", fp32_path.name)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            names = ", ".join(n.name for n in pending[:5])
            raise ValueError(f"graph has a cycle or a dangling input near: {names}")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
