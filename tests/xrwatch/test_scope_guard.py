"""The scope guard's two checks on the shipped default model, and the ``scope_guard`` choice
(``combined``: features and coarse layout must both be unlike the training X-rays;
``features``: the feature distance alone) in the engine, ``classify`` and the serve config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from xrwatch import defaults, flags
from xrwatch.cli._app import EXIT_ERROR, main
from xrwatch.engine import InferenceEngine
from xrwatch.errors import ConfigError
from xrwatch.serve.config import load_serve_config


@pytest.fixture
def default_model() -> Path:
    model = defaults.default_model()
    if model is None:
        pytest.fail("the package ships no default model")
    return model


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    skdata = pytest.importorskip("skimage.data")
    path = tmp_path / "photo.png"
    Image.fromarray(skdata.astronaut()).save(path)
    return path


def test_reason_says_which_checks_decided() -> None:
    both = flags.decide(0.9, ood_score=1.3, layout_checked=True)
    assert both[0] == flags.OUT_OF_SCOPE and "features and coarse layout" in both[1]
    alone = flags.decide(0.9, ood_score=1.3)
    assert alone[0] == flags.OUT_OF_SCOPE and "layout" not in alone[1]
    assert flags.decide(0.9, ood_score=0.99, layout_checked=True) == ("", "")
    either = flags.decide(0.9, ood_score=1.3, layout_checked=True, layout_either=True)
    assert either[0] == flags.OUT_OF_SCOPE and "features or coarse layout" in either[1]


def _raw_scores(model: Path, files: list[Path]) -> dict[str, Any]:
    """The shipped file's own guard outputs for ``files`` (ONNX Runtime, CPU)."""
    import numpy as np
    import onnxruntime as ort

    from xrwatch.modelmeta import read_model_metadata
    from xrwatch.preprocess import load_model_input

    spec = read_model_metadata(model).spec
    x = np.stack([load_model_input(f, spec)[0][None] for f in files]).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = ["ood_score", "feature_score", "layout_score"]
    return dict(zip(names, session.run(names, {"image": x}), strict=True))


def test_combined_is_the_models_rule_and_features_the_feature_distance_alone(
    default_model: Path, shared_xray: Path, photo: Path
) -> None:
    """The packaged default combines its checks with 'either' (its population gate, not the
    guard, handles chest films of other populations): ``ood_score`` = max(features, layout),
    so ``combined`` flags whatever ``features`` flags, and more."""
    import numpy as np

    from xrwatch.modelmeta import read_model_metadata

    assert (read_model_metadata(default_model).guard or {}).get("combine") == "either"
    files = [*sorted((shared_xray / "real" / "Normal").iterdir())[:4], photo]
    raw = _raw_scores(default_model, files)
    assert np.allclose(raw["ood_score"], np.maximum(raw["feature_score"], raw["layout_score"]))
    combined = InferenceEngine(default_model, use_gpu=False)
    strict = InferenceEngine(default_model, use_gpu=False, scope_guard="features")
    assert combined.guard_output == "ood_score" and combined.guard_layout
    assert strict.guard_output == "feature_score" and not strict.guard_layout
    for engine, key in ((combined, "ood_score"), (strict, "feature_score")):
        preds = engine.predict_paths(files)
        for p, score in zip(preds, raw[key], strict=True):
            assert p.ood_score == pytest.approx(float(score), rel=1e-4, abs=1e-5)
            assert (p.flag == flags.OUT_OF_SCOPE) is (float(score) > 1.0), (p.file, score)
    (pred,) = combined.predict_paths([photo])  # a photograph is out of scope
    assert pred.flag == flags.OUT_OF_SCOPE and "features or coarse layout" in pred.flag_reason


def test_classify_scope_guard_option(
    default_model: Path, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw_scores(default_model, [photo])
    for choice, key in (("combined", "ood_score"), ("features", "feature_score")):
        main(["classify", str(photo), "-m", str(default_model), "--format", "json", "--cpu",
              "--scope-guard", choice])  # fmt: skip
        (row,) = json.loads(capsys.readouterr().out)
        assert row["ood_score"] == pytest.approx(float(raw[key][0]), rel=1e-4), choice
        assert (row["flag"] == flags.OUT_OF_SCOPE) is (float(raw[key][0]) > 1.0), (choice, row)
    assert main(["classify", str(photo), "--scope-guard", "strict"]) == EXIT_ERROR
    assert "--scope-guard must be one of combined, features" in capsys.readouterr().err


def test_features_choice_is_harmless_without_a_layout_check(tiny_onnx_model: Path) -> None:
    engine = InferenceEngine(tiny_onnx_model, use_gpu=False, scope_guard="features")
    assert engine.guard_output == "ood_score" and not engine.guard_layout
    with pytest.raises(ValueError, match="scope_guard"):
        InferenceEngine(tiny_onnx_model, use_gpu=False, scope_guard="strict")


def test_serve_config_scope_guard(tmp_path: Path, default_model: Path) -> None:
    from xrwatch.serve.daemon import load_engine

    base = {"incoming": tmp_path / "in", "reports": tmp_path / "out", "model": default_model}
    assert load_serve_config(None, base).scope_guard == "combined"
    config = tmp_path / "xrwatch.toml"
    config.write_text('[serve]\nscope_guard = "features"\nprovider = "cpu"\n', encoding="utf-8")
    loaded = load_serve_config(config, base)
    assert loaded.scope_guard == "features"
    assert getattr(load_engine(loaded), "guard_output", None) == "feature_score"
    with pytest.raises(ConfigError, match="scope_guard"):
        load_serve_config(None, {**base, "scope_guard": "strict"})


def test_shipped_default_passes_real_chest_x_rays_and_catches_non_chest_kinds(
    default_model: Path, shared_xray: Path, photo: Path, tmp_path: Path
) -> None:
    """The issue's two rates on the shipped file: <= 3 % of ``real/``'s paediatric films
    (the default's population) flagged; the photograph, a blank page, noise and a CT slice
    (as PNG) caught."""
    import numpy as np

    from xrwatch.inputs import expand_inputs

    engine = InferenceEngine(default_model, use_gpu=False)
    kermany = [shared_xray / "real" / c for c in ("Normal", "Bacteria", "Virus")]
    real = [p for p in engine.predict_paths(expand_inputs(kermany)) if p.ok]
    flagged = [Path(p.file).name for p in real if p.flag == flags.OUT_OF_SCOPE]
    assert len(real) == 96 and len(flagged) <= 0.03 * len(real), flagged
    rng = np.random.default_rng(0)
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.full((256, 256), 250, np.uint8)).save(other / "blank.png")
    Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(other / "noise.png")
    pydicom_data = pytest.importorskip("pydicom.data")
    ct = pydicom_data.get_testdata_file("CT_small.dcm")
    if ct is not None:
        import pydicom

        pixels = pydicom.dcmread(ct).pixel_array.astype(np.float64)
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255
        Image.fromarray(pixels.astype(np.uint8)).save(other / "ct.png")
    others = engine.predict_paths([photo, *sorted(other.iterdir())])
    assert len(others) == 3 + (ct is not None)
    assert all(p.flag == flags.OUT_OF_SCOPE for p in others), [
        (Path(p.file).name, p.ood_score) for p in others
    ]


def test_dicom_age_reads_patient_age_then_birth_and_study_dates() -> None:
    from xrwatch.flags import age_years

    assert age_years("045Y") == 45
    assert age_years("018M") == pytest.approx(1.5)
    assert age_years("003W") == pytest.approx(3 * 7 / 365.25)
    assert age_years(None, "20180301", "20210301") == pytest.approx(3.0, abs=0.01)
    assert age_years("", "garbage", "20210301") is None
    assert age_years(None, "20210301", "20180301") is None  # study before birth: no age
    assert age_years(None) is None


def test_population_flag_age_overrides_the_image_and_scope_comes_first() -> None:
    from types import SimpleNamespace

    from xrwatch.flags import OUT_OF_POPULATION, OUT_OF_SCOPE, decide

    adult, child = SimpleNamespace(patient_age_years=40.0), SimpleNamespace(patient_age_years=4.0)
    gate = {"population_threshold": 0.5}
    assert decide(0.9, image_meta=adult, population=0.0, **gate)[0] == OUT_OF_POPULATION
    assert decide(0.9, image_meta=child, population=1.0, **gate) == ("", "")
    flag, why = decide(0.9, population=0.7, **gate)
    assert flag == OUT_OF_POPULATION and "0.70" in why
    assert decide(0.9, population=0.3, **gate) == ("", "")
    scope, reason = decide(0.9, ood_score=2.0, image_meta=adult, **gate)
    assert scope == OUT_OF_SCOPE and "patient age 40 y" in reason  # both reasons said
    # a model without a gate never flags by age or score
    assert decide(0.9, image_meta=adult, population=0.99) == ("", "")
