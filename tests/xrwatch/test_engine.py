"""InferenceEngine: provider choice, array and file prediction, per-file errors."""

from __future__ import annotations

import builtins
import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from xrwatch import filebatches, ortsession
from xrwatch.engine import InferenceEngine, Prediction
from xrwatch.errors import ModelError, ModelMetadataError, ProviderError
from xrwatch.preprocess import load_model_input

CLASSES = ("Normal", "Bacteria", "Virus", "COVID-19")


@pytest.fixture(scope="module")
def engine(tiny_onnx_model: Path) -> InferenceEngine:
    return InferenceEngine(tiny_onnx_model, intra_op_threads=1)


def has_gpu() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers() and (
        ortsession._cuda_driver_present()
    )


def test_exposes_model_facts(engine: InferenceEngine, tiny_onnx_model: Path) -> None:
    assert engine.classes == CLASSES
    assert engine.spec.size == 32
    assert engine.meta.arch == "tinycnn"
    assert engine.model_sha256 == hashlib.sha256(tiny_onnx_model.read_bytes()).hexdigest()
    assert engine.describe()["provider"] == engine.provider


@pytest.mark.skipif(has_gpu(), reason="a usable GPU is present")
def test_falls_back_to_cpu_and_logs_the_provider(
    tiny_onnx_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="xrwatch.engine"):
        eng = InferenceEngine(tiny_onnx_model)
    assert eng.provider == "CPUExecutionProvider"
    assert not eng.on_gpu
    assert any("runs on CPUExecutionProvider" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(has_gpu(), reason="a usable GPU is present")
def test_require_gpu_refuses_the_cpu(tiny_onnx_model: Path) -> None:
    with pytest.raises(ProviderError, match="GPU was required"):
        InferenceEngine(tiny_onnx_model, require_gpu=True)


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers() or has_gpu(),
    reason="needs the onnxruntime-gpu build on a machine without a usable GPU",
)
def test_cuda_session_attempt_that_fails_falls_back(
    tiny_onnx_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Pretend a driver exists: ORT really tries CUDA, cannot create it, and we notice."""
    calls: list[bool] = []
    monkeypatch.setattr(ortsession, "_cuda_driver_present", lambda: True)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: calls.append(True), raising=False)
    with caplog.at_level(logging.INFO, logger="xrwatch.engine"):
        eng = InferenceEngine(tiny_onnx_model)
    assert calls, "preload_dlls() should be called before trying CUDA"
    assert eng.provider == "CPUExecutionProvider"
    assert any("could not be created" in r.getMessage() for r in caplog.records)
    with pytest.raises(ProviderError, match="could not be created"):
        InferenceEngine(tiny_onnx_model, require_gpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")
def test_uses_cuda_when_present(tiny_onnx_model: Path) -> None:
    eng = InferenceEngine(tiny_onnx_model, require_gpu=True)
    assert eng.provider == "CUDAExecutionProvider"
    probs = eng.predict_arrays(np.random.default_rng(0).random((4, 32, 32), np.float32))
    cpu = InferenceEngine(tiny_onnx_model, use_gpu=False)
    np.testing.assert_allclose(
        probs,
        cpu.predict_arrays(np.random.default_rng(0).random((4, 32, 32), np.float32)),
        atol=1e-4,
    )


def test_thread_counts_are_applied(tiny_onnx_model: Path) -> None:
    eng = InferenceEngine(tiny_onnx_model, intra_op_threads=1, inter_op_threads=1)
    options = eng._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    with pytest.raises(ValueError):
        InferenceEngine(tiny_onnx_model, intra_op_threads=-1)


def test_predict_arrays(engine: InferenceEngine) -> None:
    batch = np.random.default_rng(1).random((5, 32, 32), dtype=np.float32)
    probs = engine.predict_arrays(batch)
    assert probs.shape == (5, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs, engine.predict_arrays(batch[:, None]))
    logits, probs2 = engine.run(batch)
    np.testing.assert_allclose(probs2, probs)
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), probs, atol=1e-6)
    # each row is independent of its batch-mates
    np.testing.assert_allclose(engine.predict_arrays(batch[2:3]), probs[2:3], atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 64, 64), (2, 3, 32, 32), (0, 32, 32), (32, 32)])
def test_predict_arrays_rejects_wrong_shapes(engine: InferenceEngine, shape: tuple[int]) -> None:
    with pytest.raises(ValueError, match="expected"):
        engine.predict_arrays(np.zeros(shape, np.float32))


def test_predict_paths_matches_arrays_and_keeps_order(
    engine: InferenceEngine, real_images: list[Path], real_dicoms: list[Path], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(real_images[0].read_bytes()[:300])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"
    good = real_images[::20] + real_dicoms[:2]
    paths = [good[0], corrupt, *good[1:4], text, missing, *good[4:]]

    preds = engine.predict_paths(paths, batch_size=3)

    assert [p.file for p in preds] == [str(p) for p in paths]
    by_file = {p.file: p for p in preds}
    for bad in (corrupt, text, missing):
        pred = by_file[str(bad)]
        assert pred.status == "error" and not pred.ok
        assert pred.error and pred.label is None and pred.probabilities == {}
        assert pred.model_sha256 == engine.model_sha256
    assert by_file[str(corrupt)].sha256 == hashlib.sha256(corrupt.read_bytes()).hexdigest()
    assert by_file[str(missing)].sha256 is None

    arrays = np.stack([load_model_input(p, engine.spec)[0] for p in good])
    expected = engine.predict_arrays(arrays)
    for path, row in zip(good, expected, strict=True):
        pred = by_file[str(path)]
        assert pred.status == "ok" and pred.error is None
        assert pred.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert list(pred.probabilities) == list(CLASSES)
        np.testing.assert_allclose(list(pred.probabilities.values()), row, atol=1e-6)
        assert pred.label == CLASSES[int(np.argmax(row))]
        assert pred.confidence == pytest.approx(float(row.max()), abs=1e-6)
    dicom = by_file[str(real_dicoms[0])]
    assert dicom.sop_instance_uid and dicom.study_instance_uid and dicom.series_instance_uid
    assert by_file[str(good[0])].sop_instance_uid is None


def test_batch_size_does_not_change_results(
    engine: InferenceEngine, real_images: list[Path]
) -> None:
    paths = real_images[::13]
    one = engine.predict_paths(paths, batch_size=1)
    many = engine.predict_paths(paths, batch_size=64)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(
            list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-6
        )
    with pytest.raises(ValueError):
        engine.predict_paths(paths, batch_size=0)


def test_unexpected_reader_error_is_captured(
    engine: InferenceEngine, real_images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = filebatches.load_model_input

    def flaky(path: Path, spec: object, **kwargs: object) -> object:
        if Path(path) == real_images[1]:
            raise RuntimeError("reader bug")
        return real(path, spec, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(filebatches, "load_model_input", flaky)
    preds = engine.predict_paths(real_images[:3])
    assert [p.status for p in preds] == ["ok", "error", "ok"]
    assert "reader bug" in (preds[1].error or "")


def test_prediction_helpers(engine: InferenceEngine) -> None:
    ok = engine.prediction("a.png", np.array([0.1, 0.2, 0.6, 0.1]), sha256="s")
    assert (ok.label, ok.confidence, ok.status) == ("Virus", pytest.approx(0.6), "ok")
    assert ok.to_dict()["probabilities"]["Virus"] == pytest.approx(0.6)
    failed = engine.failure("b.png", "unreadable")
    assert isinstance(failed, Prediction) and failed.to_dict()["error"] == "unreadable"
    with pytest.raises(ValueError):
        engine.prediction("c.png", np.array([0.5, 0.5]))


def test_bad_model_files(tmp_path: Path, tiny_onnx_model: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        InferenceEngine(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("garbage")
    with pytest.raises(ModelError, match=r"junk\.onnx"):
        InferenceEngine(junk)


def test_metadata_must_fit_the_graph(tiny_onnx_model: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(tiny_onnx_model))
    for prop in model.metadata_props:
        if prop.key == "xrwatch.classes":
            prop.value = '["A", "B", "C"]'
    bad = tmp_path / "three.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ModelError, match="3 classes"):
        InferenceEngine(bad)
    stripped = tmp_path / "stripped.onnx"
    del model.metadata_props[:]
    onnx.save(model, str(stripped))
    with pytest.raises(ModelMetadataError, match=r"stripped\.onnx"):
        InferenceEngine(stripped)


def test_each_file_is_read_once(
    engine: InferenceEngine,
    real_images: list[Path],
    real_dicoms: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine hashes and decodes the same bytes: each file is opened once, not twice."""
    files = [real_images[0], real_dicoms[0]]
    wanted = {str(f) for f in files}
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | Path) and str(file) in wanted:
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    preds = engine.predict_paths(files)
    assert [p.status for p in preds] == ["ok", "ok"]
    assert sorted(opened) == sorted(wanted)
    for pred, path in zip(preds, files, strict=True):
        assert pred.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
