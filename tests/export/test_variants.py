"""int8 (static QDQ, per-channel) and fp16 variants: verified, self-describing, servable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import xrwatch_export.pipeline as pipeline
from tests.helpers.models import make_checkpoint
from xrwatch.engine import InferenceEngine
from xrwatch.inputs import expand_inputs
from xrwatch.modelmeta import read_model_metadata
from xrwatch.preprocess import PreprocessSpec, load_model_input
from xrwatch_export.pipeline import ExportOptions, ExportResult, export_model


def test_int8_is_static_qdq_per_channel(full_export: ExportResult) -> None:
    model = onnx.load(str(full_export.variant("int8").path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert "DynamicQuantizeLinear" not in ops  # static: scales fixed at calibration
    inits = {t.name: t for t in model.graph.initializer}
    per_channel = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weight = inits[node.input[0]]
            if weight.data_type == onnx.TensorProto.INT8 and len(weight.dims) == 4:
                per_channel.append(numpy_helper.to_array(inits[node.input[1]]).size > 1)
    assert per_channel and all(per_channel)  # every conv weight has one scale per channel
    # probabilities stay float: the softmax is not quantized
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    assert not any(
        n.op_type == "QuantizeLinear" and n.input[0] == softmax.output[0] for n in model.graph.node
    )


def test_int8_agreement_with_fp32(full_export: ExportResult, real_images: list[Path]) -> None:
    report = full_export.variant("int8").report
    assert report.passed and report.reference == "fp32 onnx"
    assert report.n_images == len(real_images)  # calibration images = verification images
    assert report.image_agreement is not None and report.image_agreement >= 0.9
    fp32 = InferenceEngine(full_export.variant("fp32").path, use_gpu=False)
    int8 = InferenceEngine(full_export.variant("int8").path, use_gpu=False)
    assert int8.meta.precision == "int8" and int8.classes == fp32.classes
    assert int8.meta.checkpoint_sha256 == fp32.meta.checkpoint_sha256
    a = fp32.predict_paths(real_images, batch_size=32)
    b = int8.predict_paths(real_images, batch_size=32)
    agree = np.mean([x.label == y.label for x, y in zip(a, b, strict=True)])
    assert agree == report.image_agreement
    diffs = [abs(x.confidence - y.confidence) for x, y in zip(a, b, strict=True)]  # type: ignore[operator]
    assert max(diffs) < 0.1


def test_fp16_keeps_float32_io_and_agrees(full_export: ExportResult) -> None:
    variant = full_export.variant("fp16")
    assert variant.report.passed and variant.report.max_abs_diff <= 1e-2
    model = onnx.load(str(variant.path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert read_model_metadata(variant.path).precision == "fp16"
    engine = InferenceEngine(variant.path, use_gpu=False)
    batch = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
    fp32 = InferenceEngine(full_export.variant("fp32").path, use_gpu=False)
    np.testing.assert_allclose(engine.predict_arrays(batch), fp32.predict_arrays(batch), atol=1e-2)


def test_model_card(full_export: ExportResult) -> None:
    assert full_export.card is not None
    card = full_export.card.read_text()
    assert "not a medical device" in card and "Intended use" in card
    for c in full_export.meta.classes:
        assert c in card
    for v in full_export.variants:
        assert v.sha256 in card and v.path.name in card
    assert full_export.meta.checkpoint_sha256 in card
    assert "size 64 x 64" in card and "balanced accuracy" in card
    assert "int8 vs fp32 onnx" in card and "fp32 vs torch" in card
    # the data and recipe the checkpoint's config records
    assert '"data": "synthetic-test-data"' in card and '"task": "multiclass"' in card
    assert '"lr": 0.001' in card and '"lr_step": 10' in card and '"sampler": "plain"' in card


def test_unfoldable_batchnorm_becomes_an_exact_depthwise_conv() -> None:
    """DenseNet's pre-activation BatchNorms are rewritten so int8 can quantize them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from xrwatch_export.quantize import batchnorm_to_depthwise_conv

    rng = np.random.default_rng(0)
    c = 6
    params = {
        "gamma": rng.random(c) + 0.5,
        "beta": rng.standard_normal(c),
        "mean": rng.standard_normal(c),
        "var": rng.random(c) + 0.1,
    }
    graph = helper.make_graph(
        [
            helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
            helper.make_node(
                "BatchNormalization",
                ["cat", "gamma", "beta", "mean", "var"],
                ["bn"],
                name="norm1",
                epsilon=1e-5,
            ),
            helper.make_node("Relu", ["bn"], ["y"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 2, 5, 5]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 4, 5, 5]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, c, 5, 5])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    feed = {
        "a": rng.standard_normal((2, 2, 5, 5)).astype(np.float32),
        "b": rng.standard_normal((2, 4, 5, 5)).astype(np.float32),
    }
    before = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    assert batchnorm_to_depthwise_conv(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Concat", "Conv", "Relu"]
    conv = model.graph.node[1]
    assert any(a.name == "group" and a.i == c for a in conv.attribute)
    assert {t.name for t in model.graph.initializer} == set(conv.input[1:])  # BN params gone
    after = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_int8_calibrates_on_images_read_through_load_model_input(
    tmp_path: Path, shared_xray: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calibration batch is exactly what serving feeds the model for those files."""
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", size=32)
    folder = shared_xray / "real" / "COVID-19"
    seen: dict[str, np.ndarray] = {}

    class Stop(Exception):
        pass

    def capture(fp32: Path, out: Path, calibration: np.ndarray, **kwargs: object) -> None:
        seen["calibration"] = calibration
        raise Stop

    monkeypatch.setattr(pipeline, "quantize_int8", capture)
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(Stop):
        export_model(ExportOptions(source=ckpt, output=out, int8=True, calibration=(folder,)))
    spec = PreprocessSpec(size=32)
    expected = np.stack([load_model_input(p, spec)[0][None] for p in expand_inputs([folder])])
    np.testing.assert_array_equal(seen["calibration"], expected)
    assert list(out.parent.iterdir()) == []  # an export that fails half-way leaves nothing
