"""Export verifies at one ONNX Runtime graph-optimisation level, records it in the model's
metadata, and serving runs the model at that level (int8 results depend on it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from xrwatch.engine import CPU_EP, CUDA_EP, InferenceEngine, optimization_caveat
from xrwatch.errors import ModelMetadataError
from xrwatch.modelmeta import KEY_GRAPH_OPTIMIZATION, read_model_metadata
from xrwatch_export.verify import onnx_probabilities

LEVELS = ort.GraphOptimizationLevel


def _with_level(model: Path, dest: Path, level: str | None) -> Path:
    """A copy of ``model`` whose metadata records ``level`` (None: no key, an older model)."""
    proto = onnx.load(str(model))
    props = [p for p in proto.metadata_props if p.key != KEY_GRAPH_OPTIMIZATION]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    if level is not None:
        proto.metadata_props.add(key=KEY_GRAPH_OPTIMIZATION, value=level)
    onnx.save(proto, str(dest))
    return dest


def _level(engine: InferenceEngine) -> object:
    return engine._session.get_session_options().graph_optimization_level


def test_export_records_the_level_it_verified_at(tiny_onnx_model: Path) -> None:
    session = ort.InferenceSession(str(tiny_onnx_model), providers=[CPU_EP])
    props = session.get_modelmeta().custom_metadata_map
    assert props[KEY_GRAPH_OPTIMIZATION] == "all"
    assert read_model_metadata(tiny_onnx_model).graph_optimization == "all"


def test_serving_runs_at_the_recorded_level(tiny_onnx_model: Path, tmp_path: Path) -> None:
    basic = _with_level(tiny_onnx_model, tmp_path / "basic.onnx", "basic")
    engine = InferenceEngine(basic, use_gpu=False)
    assert engine.meta.graph_optimization == "basic"
    assert _level(engine) == LEVELS.ORT_ENABLE_BASIC
    assert engine.describe()["graph_optimization"] == "basic"
    # verification at that level computes exactly what serving computes
    x = np.random.default_rng(0).random((5, 1, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(onnx_probabilities(basic, x, "basic"), engine.predict_arrays(x))

    old = _with_level(tiny_onnx_model, tmp_path / "old.onnx", None)  # before the key existed
    engine = InferenceEngine(old, use_gpu=False)
    assert engine.meta.graph_optimization == "all" and _level(engine) == LEVELS.ORT_ENABLE_ALL

    bad = _with_level(tiny_onnx_model, tmp_path / "bad.onnx", "turbo")
    with pytest.raises(ModelMetadataError, match=r"graph_optimization must be one of .*'turbo'"):
        InferenceEngine(bad, use_gpu=False)


def test_serving_warns_when_another_provider_cannot_reproduce_int8(tiny_onnx_model: Path) -> None:
    meta = read_model_metadata(tiny_onnx_model)
    int8 = dataclasses.replace(meta, precision="int8")
    caveat = optimization_caveat(int8, CUDA_EP)
    assert caveat is not None
    assert str(tiny_onnx_model) in caveat and "'all'" in caveat and CUDA_EP in caveat
    assert optimization_caveat(int8, CPU_EP) is None
    assert optimization_caveat(meta, CUDA_EP) is None  # fp32: within the verified tolerance
