"""Export: one verified, self-describing ONNX file that computes what torch computes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import xrwatch_export.pipeline as pipeline
from tests.helpers.cam import assert_cam_matches_grad_cam
from tests.helpers.models import make_checkpoint
from xrwatch.cli._app import EXIT_ERROR, EXIT_OK, main
from xrwatch.engine import InferenceEngine
from xrwatch.errors import ConfigError
from xrwatch.preprocess import PreprocessSpec, load_model_input
from xrwatch_export.pipeline import ExportOptions, ExportResult, export_model
from xrwatch_export.verify import ExportVerificationError
from xrwatch_training.checkpoint import load_checkpoint
from xrwatch_training.models import model_from_checkpoint
from xrwatch_training.presets import config_sha256


def torch_outputs(ckpt_path: Path, images: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    from xrwatch.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    batch = torch.from_numpy(np.stack([load_model_input(p, spec)[0][None] for p in images]))
    with torch.no_grad():
        logits = model(batch)
    return logits.numpy(), torch.softmax(logits, 1).numpy()


def test_file_format(full_export: ExportResult) -> None:
    path = full_export.variant("fp32").path
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "model.fp16.onnx",
        "model.int8.onnx",
        "model.md",
        "model.onnx",
    ]  # single files, no side data, no staging left over
    (inp,) = model.graph.input
    assert inp.name == "image"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [1, 64, 64]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    outputs = {
        o.name: [d.dim_value for d in o.type.tensor_type.shape.dim][1:] for o in model.graph.output
    }
    # 64 px through four 2x poolings: a 4 x 4 class activation map per class
    assert outputs == {"logits": [4], "probabilities": [4], "cam": [4, 4, 4]}


def test_metadata_written_per_contract(full_export: ExportResult) -> None:
    ckpt_path = full_export.selection.path
    ckpt = load_checkpoint(ckpt_path)
    model = onnx.load(str(full_export.variant("fp32").path))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["xrwatch.format_version"] == "1"
    assert json.loads(props["xrwatch.classes"]) == ckpt["classes"]
    # mean/std are applied inside the graph only, so the metadata no longer lists them
    # (xrwatch.input states the contract); readers fill in the same spec
    listed = json.loads(props["xrwatch.preprocess"])
    assert listed == {k: v for k, v in ckpt["preprocess"].items() if k not in ("mean", "std")}
    assert PreprocessSpec.from_json(props["xrwatch.preprocess"]) == PreprocessSpec.from_dict(
        ckpt["preprocess"]
    )
    assert "inside the graph" in json.loads(props["xrwatch.input"])["normalisation"]
    assert props["xrwatch.arch"] == "tinycnn"
    assert props["xrwatch.experiment"] == "custom"
    assert props["xrwatch.task"] == "multiclass"
    assert props["xrwatch.precision"] == "fp32"
    assert props["xrwatch.checkpoint_sha256"] == hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    canonical = json.dumps(ckpt["config"], sort_keys=True, separators=(",", ":"))
    assert props["xrwatch.config_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert props["xrwatch.config_sha256"] == config_sha256(ckpt["config"])
    assert json.loads(props["xrwatch.metrics"]) == {"val": ckpt["metrics"]["val"], "test": None}
    assert props["xrwatch.version"] and props["xrwatch.created_at"]
    assert full_export.meta.checkpoint_sha256 == full_export.checkpoint_sha256


def test_parity_with_torch_on_real_images(
    full_export: ExportResult, real_images: list[Path]
) -> None:
    report = full_export.variant("fp32").report
    assert report.passed and report.n_images == len(real_images) and report.n_random > 0
    assert report.max_abs_diff <= 1e-4 and report.argmax_agreement == 1.0
    # and independently of the exporter's own check, through the serving engine:
    engine = InferenceEngine(full_export.variant("fp32").path, use_gpu=False)
    preds = engine.predict_paths(real_images, batch_size=16)
    logits, probs = torch_outputs(full_export.selection.path, real_images)
    onnx_logits, _ = engine.run(
        np.stack([load_model_input(p, engine.spec)[0] for p in real_images])
    )
    np.testing.assert_allclose(onnx_logits, logits, rtol=1e-4, atol=1e-4)
    for pred, row in zip(preds, probs, strict=True):
        assert pred.ok
        np.testing.assert_allclose(list(pred.probabilities.values()), row, atol=1e-4)
        assert pred.label == engine.classes[int(row.argmax())]


@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_parity_study_architectures(arch: str, tmp_path: Path, shared_xray: Path) -> None:
    """The study's networks (random weights, 96 px: 3 x 3 feature maps) export within
    tolerance on real images, and their ``cam`` output matches pytorch-grad-cam's."""
    images = tmp_path / "verify"  # 12 real films: verification runs torch and ORT on each
    images.mkdir()
    for src in sorted((shared_xray / "real" / "Virus").iterdir())[:12]:
        shutil.copyfile(src, images / src.name)
    ckpt = make_checkpoint(tmp_path / "best.pt", arch=arch, size=96, seed=1)
    result = export_model(
        ExportOptions(source=ckpt, output=tmp_path / "m.onnx", verify_images=(images,), card=False)
    )
    report = result.variant("fp32").report
    assert report.passed and report.n_images == len(list(images.iterdir()))
    files = sorted(images.iterdir())[:8]
    logits, probs = torch_outputs(ckpt, files)
    engine = InferenceEngine(result.variant("fp32").path, use_gpu=False)
    onnx_logits, onnx_probs = engine.run(
        np.stack([load_model_input(p, engine.spec)[0] for p in files])
    )
    # logits too: random deep nets saturate the softmax, which would hide differences
    np.testing.assert_allclose(onnx_logits, logits, rtol=1e-3, atol=1e-3 * np.abs(logits).max())
    np.testing.assert_allclose(onnx_probs, probs, atol=1e-4)
    assert (onnx_probs.argmax(1) == probs.argmax(1)).all()
    assert_cam_matches_grad_cam(ckpt, result.variant("fp32").path, files[:3], 96)


def test_failed_verification_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = make_checkpoint(tmp_path / "best.pt", size=32)
    real = pipeline.torch_probabilities

    def off_by_a_bit(model: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
        probs = real(model, inputs)
        probs[:, 0] += 1e-3  # as if the graph computed something slightly different
        return probs

    monkeypatch.setattr(pipeline, "torch_probabilities", off_by_a_bit)
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(ExportVerificationError, match="verification failed") as err:
        export_model(ExportOptions(source=ckpt, output=out))
    assert "model.onnx" in str(err.value)
    assert list(out.parent.iterdir()) == []  # no model, no card, no staging folder


def test_existing_model_survives_a_failed_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = make_checkpoint(tmp_path / "best.pt", size=32)
    out = tmp_path / "model.onnx"
    export_model(ExportOptions(source=ckpt, output=out, card=False))
    before = out.read_bytes()
    monkeypatch.setattr(
        pipeline, "torch_probabilities", lambda m, x: np.full((len(x), 4), 0.25, np.float32)
    )
    with pytest.raises(ExportVerificationError):
        export_model(ExportOptions(source=ckpt, output=out, card=False))
    assert out.read_bytes() == before


def test_a_run_interrupted_before_its_first_epoch_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xrwatch_training.checkpoint import save_checkpoint

    # what training's Ctrl-C handler writes when no epoch has finished: last.pt only,
    # epoch 0, no metrics
    run = tmp_path / "run"
    ckpt = load_checkpoint(make_checkpoint(run / "last.pt", size=32, epoch=0))
    ckpt["metrics"] = {"val": None, "test": None, "train": None}
    save_checkpoint(ckpt, run / "last.pt")
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(ConfigError, match="no completed training epoch"):
        export_model(ExportOptions(source=run, output=out))
    assert main(["export", str(run), "-o", str(out)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"{run / 'last.pt'}: no completed training epoch (epoch 0, no validation" in err
    assert not out.exists()


def test_option_errors(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", size=32)
    with pytest.raises(ConfigError, match="calibration"):
        export_model(ExportOptions(source=ckpt, output=tmp_path / "m.onnx", int8=True))
    with pytest.raises(ConfigError, match=r"\.onnx"):
        export_model(ExportOptions(source=ckpt, output=tmp_path / "m.bin"))
    with pytest.raises(ConfigError, match=r"no best\.pt"):
        export_model(ExportOptions(source=tmp_path, output=tmp_path / "m.onnx"))
    with pytest.raises(ConfigError, match="no such"):
        export_model(ExportOptions(source=tmp_path / "nope", output=tmp_path / "m.onnx"))


def test_cli_export_then_classify(
    tmp_path: Path, shared_xray: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = make_checkpoint(tmp_path / "runs" / "a" / "best.pt", size=32)
    out = tmp_path / "model.onnx"
    images = shared_xray / "real" / "COVID-19"
    code = main(["export", str(ckpt.parent), "-o", str(out), "--verify-images", str(images)])
    stdout, _ = capsys.readouterr()
    assert code == EXIT_OK, stdout
    assert out.is_file() and (tmp_path / "model.md").is_file()
    assert "fp32 vs torch" in stdout and "best.pt of run folder" in stdout
    code = main(["classify", str(images), "--model", str(out), "-f", "json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK and len(rows) == len(list(images.iterdir()))
    code = main(["export", str(ckpt), "-o", str(tmp_path / "x.onnx"), "--int8"])
    assert code == EXIT_ERROR and "--calibration" in capsys.readouterr().err
