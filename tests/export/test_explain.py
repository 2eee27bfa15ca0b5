"""Heatmaps (cam), calibration and the scope guard in the exported graph, checked against
independent implementations: pytorch-grad-cam for the maps, netcal for the ECE."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.helpers.cam import assert_cam_matches_grad_cam
from tests.helpers.models import make_checkpoint
from xrwatch import modelmeta as mm
from xrwatch.evaluation import choose_low_confidence
from xrwatch.preprocess import load_model_input
from xrwatch_export.pipeline import ExportOptions, export_model
from xrwatch_training.calibration import (
    ece_intervals,
    expected_calibration_error,
    fit_temperature,
    softmax,
)


def test_tinycnn_cam_matches_grad_cam(tmp_path: Path, real_images: list[Path]) -> None:
    """tinycnn here; resnet50 and densenet121 in test_export's parity test (one export each)."""
    ckpt_path = make_checkpoint(tmp_path / "run" / "best.pt", arch="tinycnn", size=64, seed=1)
    out = tmp_path / "model.onnx"
    export_model(ExportOptions(source=ckpt_path, output=out, card=False))
    picks = [real_images[0], real_images[len(real_images) // 2], real_images[-1]]
    assert_cam_matches_grad_cam(ckpt_path, out, picks, 64)


def test_ece_matches_netcal_and_temperature_keeps_argmax() -> None:
    netcal = pytest.importorskip("netcal.metrics")
    rng = np.random.default_rng(0)
    n, c = 400, 4
    labels = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), labels] += rng.normal(1.0, 1.0, n)  # informative ...
    logits *= 4.0  # ... and overconfident, as deep nets are
    t = fit_temperature(logits[:200], labels[:200])
    assert t > 1.5  # overconfidence is cooled, not heated
    for probs in (softmax(logits), softmax(logits, t)):
        ours = expected_calibration_error(probs, labels, bins=15)
        theirs = netcal.ECE(bins=15).measure(probs, labels)
        assert ours == pytest.approx(theirs, abs=1e-9)
    assert (softmax(logits, t).argmax(1) == logits.argmax(1)).all()
    held_out = slice(200, None)
    before = expected_calibration_error(softmax(logits[held_out]), labels[held_out])
    after = expected_calibration_error(softmax(logits[held_out], t), labels[held_out])
    assert after < before


def _overconfident(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), labels] += rng.normal(1.0, 1.0, n)
    return logits * 4.0, labels


def test_ece_intervals_agree_with_scipys_paired_bootstrap() -> None:
    from scipy import stats

    logits, labels = _overconfident(300)
    before, after = softmax(logits), softmax(logits, 3.0)
    ours = ece_intervals(before, after, labels, resamples=2000, seed=1)

    def change(b_idx: np.ndarray, axis: int = -1) -> float:
        i = b_idx.astype(int)
        return expected_calibration_error(after[i], labels[i]) - expected_calibration_error(
            before[i], labels[i]
        )

    for key, statistic in (
        ("change", change),
        ("before", lambda i, axis=-1: expected_calibration_error(before[i], labels[i])),
        ("after", lambda i, axis=-1: expected_calibration_error(after[i], labels[i])),
    ):
        theirs = stats.bootstrap(
            (np.arange(len(labels)),),
            statistic,
            vectorized=False,
            n_resamples=2000,
            method="percentile",
            random_state=np.random.default_rng(2),
        ).confidence_interval
        assert ours[key] == pytest.approx([theirs.low, theirs.high], abs=0.015), key
    assert ours["change"][1] < 0  # cooling an overconfident model: ECE clearly lower


def test_ece_intervals_of_an_unchanged_model_hold_zero_and_need_matching_shapes() -> None:
    logits, labels = _overconfident(120, seed=3)
    probs = softmax(logits)
    out = ece_intervals(probs, probs, labels, resamples=200)
    assert out["change"] == [0.0, 0.0] and out["before"] == out["after"]
    assert out["before"][0] <= expected_calibration_error(probs, labels) <= out["before"][1]
    assert ece_intervals(probs, probs, labels, resamples=200) == out  # seeded: repeatable
    with pytest.raises(ValueError, match="N x C"):
        ece_intervals(probs, probs[:-1], labels)


def test_fitted_export_carries_calibration_and_guard(fitted_run: Path) -> None:
    model = fitted_run / "model.onnx"
    meta = mm.read_model_metadata(model)
    assert meta.cam is not None and meta.calibration is not None and meta.guard is not None
    cal = meta.calibration
    assert cal["bins"] == 15 and cal["temperature"] > 0
    assert cal["measured_on"] == "fp32 onnx" and set(cal["fp32_ece"]) == {"val", "test"}
    for split in ("val", "test"):
        e = cal["ece"][split]
        assert set(e) == {"before", "after", "n"} | {
            f"interval_{k}" for k in ("before", "after", "change")
        }
        assert e["interval_change"][0] <= e["interval_change"][1]
    assert meta.guard["val_pass_rate"] >= 0.97
    assert (fitted_run / "reliability.png").stat().st_size > 0
    card = (fitted_run / "model.md").read_text(encoding="utf-8")
    assert "ECE" in card and "not a segmentation" in card

    outputs = [o.name for o in onnx.load(str(model)).graph.output]
    assert outputs == [
        "logits", "probabilities", "cam", "ood_score", "contrast", "feature_score", "layout_score"
    ]  # fmt: skip
    # the temperature is in the graph: probabilities = softmax(logits / T), same argmax
    rows = list(csv.DictReader((fitted_run / "splits" / "test.csv").open(encoding="utf-8")))
    x = np.stack([load_model_input(Path(r["path"]), meta.spec)[0][None] for r in rows])
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits, probs = session.run(["logits", "probabilities"], {"image": x.astype(np.float32)})
    np.testing.assert_allclose(probs, softmax(logits, cal["temperature"]), atol=1e-5)
    assert (probs.argmax(1) == logits.argmax(1)).all()
    # low_confidence was not given: chosen on the validation split at the fitted T, the
    # highest threshold flagging at most 20 % of the right predictions there
    rule = cal["low_confidence_rule"]
    assert rule["chosen_on"].startswith("validation split") and rule["max_right_flagged"] == 0.2
    assert cal["low_confidence"] == rule["threshold"] and 0.0 < rule["threshold"] < 1.0
    val = list(csv.DictReader((fitted_run / "splits" / "val.csv").open(encoding="utf-8")))
    xv = np.stack([load_model_input(Path(r["path"]), meta.spec)[0][None] for r in val])
    (pv,) = session.run(["probabilities"], {"image": xv.astype(np.float32)})
    yv = np.array([meta.classes.index(r["label"]) for r in val])
    again = choose_low_confidence(pv.argmax(1) == yv, pv.max(1), max_right_flagged=0.2)
    assert abs(again["threshold"] - cal["low_confidence"]) <= 0.01 + 1e-9  # fp32 ONNX vs torch
    assert "chosen on the validation split" in " ".join(card.split())
    # the card's ECE is this file's own, on the test split it was measured on
    labels = np.array([meta.classes.index(r["label"]) for r in rows])
    assert cal["ece"]["test"]["n"] == len(labels)
    assert cal["ece"]["test"]["after"] == pytest.approx(
        expected_calibration_error(probs, labels), abs=1e-6
    )
    assert cal["ece"]["test"]["before"] == pytest.approx(
        expected_calibration_error(softmax(logits), labels), abs=1e-6
    )
    e = cal["ece"]["test"]
    assert (
        f"| test | {len(labels)} | {e['before']:.4f} | {e['after']:.4f} | "
        f"{e['after'] - e['before']:+.4f} ({e['interval_change'][0]:+.3f} to "
        f"{e['interval_change'][1]:+.3f}) |"
    ) in card
    assert json.loads(json.dumps(meta.to_dict()))["guard"]["method"] == "mahalanobis"


def test_int8_keeps_the_guard_in_float(fitted_run: Path) -> None:
    """Quantizing the Mahalanobis distance to 8 bits could move it across its threshold."""
    from xrwatch_export.quantize import _guard_only_nodes

    model = onnx.load(str(fitted_run / "model.onnx"))
    names = set(_guard_only_nodes(model))
    by_name = {n.name: n for n in model.graph.node}
    ops = {by_name[n].op_type for n in names}
    assert "MatMul" in ops or "Gemm" in ops  # (features - mean) @ whitening
    assert "Conv" not in ops and "Softmax" not in ops  # the classifier is not touched


def test_guard_scores_match_a_numpy_reference(fitted_run: Path) -> None:
    """``feature_score``, ``layout_score`` and their minimum ``ood_score``, recomputed with
    numpy from the statistics in the graph and the metadata (not through torch)."""
    from onnx import numpy_helper

    from xrwatch_export.explain import (
        FeatureNet,
        layout_distance,
        mahalanobis,
        run_feature_net,
        thumbnails,
    )
    from xrwatch_export.pipeline import model_from_checkpoint
    from xrwatch_training.checkpoint import load_checkpoint

    model = fitted_run / "model.onnx"
    guard = mm.read_model_metadata(model).guard or {}
    layout = guard["layout"]
    assert layout["grid"] == 8 and layout["components"] == 8
    consts = {
        i.name: numpy_helper.to_array(i).astype(np.float64)
        for i in onnx.load(str(model)).graph.initializer
    }
    x = np.concatenate([_val_inputs(fitted_run), _val_inputs(fitted_run, "test")])
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ood, feature, lay = session.run(["ood_score", "feature_score", "layout_score"], {"image": x})
    basis = consts["layout_basis"]
    np.testing.assert_allclose(basis @ basis.T, np.eye(8), atol=1e-5)  # orthonormal rows
    expected = layout_distance(
        thumbnails(x, 8),
        consts["layout_mean"],
        basis,
        consts["layout_inv_std"],
        float(consts["layout_inv_noise_std"]),
    )
    np.testing.assert_allclose(lay, expected / layout["raw_threshold"], rtol=1e-4, atol=1e-4)
    # the feature part from the checkpoint's own pooled features (torch, fp32)
    net = FeatureNet(model_from_checkpoint(load_checkpoint(fitted_run / "best.pt")))
    pooled, _ = run_feature_net(net, x)
    distance = mahalanobis(pooled, consts["guard_mean"], consts["guard_whitening"])
    np.testing.assert_allclose(feature, distance / guard["raw_threshold"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ood, np.minimum(feature, lay), rtol=1e-6)
    assert (feature > 1).any() or (lay > 1).any() or len(x) < 50  # thresholds bite somewhere


def test_layout_score_separates_a_photograph_from_chest_x_rays(fitted_run: Path) -> None:
    """The coarse-layout check alone: scikit-image's photographs lie far from the training
    thumbnails' principal subspace, the run's own chest X-rays near it."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    model = fitted_run / "model.onnx"
    size = mm.read_model_metadata(model).spec.size
    photos = []
    for name in ("astronaut", "coffee", "camera", "cat"):
        img = Image.fromarray(np.asarray(getattr(skdata, name)())).convert("L")
        photos.append(np.asarray(img.resize((size, size)), np.float32)[None] / 255.0)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (photo,) = session.run(["layout_score"], {"image": np.stack(photos)})
    (chest,) = session.run(["layout_score"], {"image": _val_inputs(fitted_run)})
    assert (photo > 1.0).all(), photo
    assert np.median(chest) < 1.0


def _val_inputs(run: Path, split: str = "val") -> np.ndarray:
    meta = mm.read_model_metadata(run / "model.onnx")
    rows = list(csv.DictReader((run / "splits" / f"{split}.csv").open(encoding="utf-8")))
    arrays = [load_model_input(Path(r["path"]), meta.spec)[0][None] for r in rows]
    return np.stack(arrays).astype(np.float32)


def _ort_pass_rate(model: Path, x: np.ndarray) -> float:
    guard = mm.read_model_metadata(model).guard or {}
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ood, contrast = session.run(["ood_score", "contrast"], {"image": x})
    return float(((ood <= 1.0) & (contrast >= guard["min_contrast"])).mean())


def _threshold(model: Path, name: str = "guard_threshold") -> float:
    init = next(i for i in onnx.load(str(model)).graph.initializer if i.name == name)
    return float(onnx.numpy_helper.to_array(init))


def _own_pass_rates(model: Path, x: np.ndarray) -> tuple[float, float]:
    """The validation pass rate of ``feature_score`` and of ``layout_score``, each alone."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feature, layout = session.run(["feature_score", "layout_score"], {"image": x})
    return float((feature <= 1.0).mean()), float((layout <= 1.0).mean())


def test_guard_threshold_is_chosen_on_each_variants_own_scores(
    fitted_run: Path, tmp_path: Path, shared_xray: Path
) -> None:
    """int8 moves the features: the threshold chosen on torch's fp32 distances let fewer
    validation images pass on the shipped int8 model (96.6 % instead of 98 %)."""
    out = tmp_path / "model.onnx"
    real = shared_xray / "real"
    export_model(
        ExportOptions(
            source=fitted_run, output=out, int8=True, calibration=(real,), min_int8_agreement=0.5
        )
    )
    val, test = _val_inputs(fitted_run), _val_inputs(fitted_run, "test")
    for precision, model in (("fp32", out), ("int8", out.with_name("model.int8.onnx"))):
        guard = mm.read_model_metadata(model).guard or {}
        assert guard["tuned_on"] == f"{precision} onnx, validation split"
        measured = _ort_pass_rate(model, val)
        assert measured == pytest.approx(guard["val_pass_rate"])  # what the metadata says
        assert measured >= guard["target_pass_rate"]
        assert _ort_pass_rate(model, test) == pytest.approx(guard["test_pass_rate"])
        assert guard["raw_threshold"] == pytest.approx(_threshold(model), rel=1e-6)
        layout = guard["layout"]
        assert layout["raw_threshold"] == pytest.approx(
            _threshold(model, "layout_threshold"), rel=1e-6
        )
        assert min(_own_pass_rates(model, val)) >= guard["target_pass_rate"]  # each check


def test_tune_guard_restores_the_pass_rate_and_is_idempotent(
    fitted_run: Path, tmp_path: Path
) -> None:
    from onnx import numpy_helper

    from xrwatch_export.guardtune import GUARD_SCORES, tune_guard
    from xrwatch_export.verify import file_outputs

    model = onnx.load(str(fitted_run / "model.onnx"))
    for init in model.graph.initializer:  # thresholds far too tight, as if from other scores
        if init.name in ("guard_threshold", "layout_threshold"):
            value = numpy_helper.to_array(init) * np.float32(0.5)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    for prop in model.metadata_props:
        if prop.key == mm.KEY_GUARD:
            guard = json.loads(prop.value)
            guard.pop("tuned_on", None)
            prop.value = json.dumps(guard)
    path = tmp_path / "loose.onnx"
    onnx.save(model, str(path))
    val = _val_inputs(fitted_run)
    assert _ort_pass_rate(path, val) < 0.9
    tuned = tune_guard(path, file_outputs(path, {"val": val}, GUARD_SCORES), precision="fp32")
    assert tuned is not None and tuned["tuned_on"].startswith("fp32")
    assert _ort_pass_rate(path, val) >= 0.98 and tuned["val_pass_rate"] >= 0.98
    assert min(_own_pass_rates(path, val)) >= 0.98  # both thresholds re-chosen, not just one
    assert tuned["layout"]["raw_threshold"] == pytest.approx(
        _threshold(path, "layout_threshold"), rel=1e-6
    )
    before = path.read_bytes()
    tune_guard(path, file_outputs(path, {"val": val}, GUARD_SCORES), precision="fp32")
    assert path.read_bytes() == before


def test_layout_check_needs_a_side_divisible_by_the_grid(caplog: pytest.LogCaptureFixture) -> None:
    from xrwatch.preprocess import PreprocessSpec
    from xrwatch_export.fitting import fit_layout_stats

    caplog.set_level("INFO", logger="xrwatch_export.fitting")
    rng = np.random.default_rng(0)
    for size, expected in ((64, 8), (60, None)):
        train = rng.random((40, 1, size, size)).astype(np.float32)
        val = rng.random((20, 1, size, size)).astype(np.float32)
        layout = fit_layout_stats(train, val, PreprocessSpec(size=size), 0.9)
        assert (layout.pool if layout else None) == expected
    assert "not a multiple of 8" in caplog.text
