"""Export of a checkpoint with a population unit (the packaged default's recipe, tiny):
``population`` output, renormalised diagnoses, input contract, shipped temperature."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.training.pedfixture import write_fake_shared
    from xrwatch_export.pipeline import ExportOptions, export_model
    from xrwatch_training.default_recipe import DefaultConfig, train_default

    root = tmp_path_factory.mktemp("gated")
    shared = write_fake_shared(root / "shared", per_class=8)
    cfg = DefaultConfig(data=str(shared), arch="tinycnn", image_size=32, epochs=1,
                        batch_size=8, max_steps_per_epoch=2, cache_dir=str(root / "cache"),
                        threads=1)  # fmt: skip
    run = train_default(cfg, root / "run")
    result = export_model(
        ExportOptions(source=run / "best.pt", output=root / "out" / "model.onnx",
                      int8=True, calibration=(shared / "real",), min_int8_agreement=0.0,
                      temperature=1.0, temperature_reason="test: held-out NLL not lower",
                      guard_combine="either")
    )  # fmt: skip
    return {"run": run, "result": result, "shared": shared}


def test_population_output_is_the_adult_share_and_diagnoses_renormalise(
    gated: dict[str, Any],
) -> None:
    import onnxruntime as ort
    import torch

    from xrwatch_training.checkpoint import load_checkpoint
    from xrwatch_training.models import model_from_checkpoint

    path = gated["result"].variant("fp32").path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert "population" in names and "cam" in names
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    out = dict(zip(names, session.run(names, {"image": x}), strict=True))
    assert out["probabilities"].shape == (3, 3)
    assert np.allclose(out["probabilities"].sum(axis=1), 1, atol=1e-5)
    logits4 = (
        model_from_checkpoint(load_checkpoint(gated["run"] / "best.pt"))(torch.from_numpy(x))
        .detach()
        .numpy()
        .astype(np.float64)
    )
    p4 = np.exp(logits4 - logits4.max(1, keepdims=True))
    p4 /= p4.sum(1, keepdims=True)
    assert np.allclose(out["population"], p4[:, 3], atol=1e-4)
    assert np.allclose(out["probabilities"], p4[:, :3] / p4[:, :3].sum(1, keepdims=True),
                       atol=1e-4)  # fmt: skip


def test_metadata_states_the_input_contract_population_and_shipped_temperature(
    gated: dict[str, Any],
) -> None:
    from xrwatch.modelmeta import read_model_metadata

    for variant in gated["result"].variants:
        meta = read_model_metadata(variant.path)
        assert meta.population is not None and meta.population["output"] == "population"
        assert meta.population["threshold"] == 0.5
        assert meta.input is not None and meta.input["range"] == [0.0, 1.0]
        assert "inside the graph" in meta.input["normalisation"]
        assert meta.calibration is not None and meta.calibration["temperature"] == 1.0
        assert "NLL" in meta.calibration["temperature_reason"]
    import onnx

    props = {p.key: p.value for p in onnx.load(str(variant.path)).metadata_props}
    assert "mean" not in json.loads(props["xrwatch.preprocess"])


def test_engine_flags_out_of_population_by_age_first_then_by_image(
    gated: dict[str, Any],
) -> None:
    from types import SimpleNamespace

    from xrwatch.engine import InferenceEngine

    engine = InferenceEngine(gated["result"].variant("fp32").path, use_gpu=False)
    assert engine.has_population and engine.population_threshold == 0.5
    adult = SimpleNamespace(patient_age_years=45.0)
    child = SimpleNamespace(patient_age_years=3.0)
    assert engine.flag(0.99, ood_score=0.5, contrast=0.2, meta=adult, population=0.1)[0] == (
        "out_of_population"
    )
    assert engine.flag(0.99, ood_score=0.5, contrast=0.2, meta=child, population=0.99)[0] == ""
    flag, reason = engine.flag(0.99, ood_score=0.5, contrast=0.2, meta=None, population=0.9)
    assert flag == "out_of_population" and "no DICOM age" in reason
    # out_of_scope still comes first
    assert engine.flag(0.99, ood_score=3.0, contrast=0.2, meta=adult)[0] == "out_of_scope"
    x = np.random.default_rng(1).random((2, 32, 32), dtype=np.float32)
    out = engine.predict_outputs(x)
    assert out.population is not None and out.population.shape == (2,)


def test_weights_hash_ignores_metadata_and_follows_the_weights(
    gated: dict[str, Any], tmp_path: Path
) -> None:
    import onnx

    from xrwatch_export.contract import weights_sha256

    path = gated["result"].variant("fp32").path
    model = onnx.load(str(path))
    model.metadata_props.add(key="xrwatch.created_at", value="another time")
    onnx.save(model, str(tmp_path / "same.onnx"))
    assert weights_sha256(tmp_path / "same.onnx") == weights_sha256(path)
    init = model.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 1
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(tmp_path / "other.onnx"))
    assert weights_sha256(tmp_path / "other.onnx") != weights_sha256(path)


def test_either_guard_flags_when_features_or_layout_exceed(gated: dict[str, Any]) -> None:
    import onnxruntime as ort

    from xrwatch.modelmeta import read_model_metadata
    from xrwatch_export.explain import guard_passes

    path = gated["result"].variant("fp32").path
    assert read_model_metadata(path).guard["combine"] == "either"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = ["ood_score", "feature_score", "layout_score"]
    x = np.random.default_rng(2).random((4, 1, 32, 32), dtype=np.float32)
    ood, feature, layout = session.run(names, {"image": x})
    assert np.allclose(ood, np.maximum(feature, layout))
    scores = np.array([[0.5, 1.5, 0.5], [0.5, 0.5, 1.5]])
    contrast = np.ones(3)
    assert guard_passes(scores, contrast, 0.0, "either").tolist() == [True, False, False]
    assert guard_passes(scores, contrast, 0.0, "both").tolist() == [True, True, True]
