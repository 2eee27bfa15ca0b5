"""The shipped default model: lookup when --model is absent, explicit --model wins, and the
shipped file matches its model card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from xrwatch import defaults
from xrwatch.cli._app import EXIT_ERROR, EXIT_OK, main
from xrwatch.errors import ConfigError
from xrwatch.filehash import file_sha256
from xrwatch.serve.config import load_serve_config


@pytest.fixture
def image(shared_xray: Path) -> Path:
    return sorted((shared_xray / "real" / "Normal").iterdir())[0]


def test_resolve_prefers_explicit_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    shipped = tmp_path / "default.onnx"
    shipped.write_bytes(b"x")
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", shipped)
    assert defaults.resolve_model(None) == shipped
    assert defaults.resolve_model(tmp_path / "mine.onnx") == tmp_path / "mine.onnx"
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tmp_path / "absent.onnx")
    assert defaults.default_model() is None
    with pytest.raises(ConfigError, match="no default model shipped"):
        defaults.resolve_model(None)


def test_classify_without_model_uses_the_default(
    image: Path, tiny_onnx_model: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tiny_onnx_model)
    assert main(["classify", str(image), "--format", "json"]) == EXIT_OK
    [row] = json.loads(capsys.readouterr().out)
    assert row["status"] == "ok" and row["model_sha256"] == file_sha256(tiny_onnx_model)


def test_explicit_model_wins_over_the_default(
    image: Path, tiny_onnx_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    broken = tmp_path / "default.onnx"
    broken.write_bytes(b"not a model")
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", broken)
    code = main(["classify", str(image), "-m", str(tiny_onnx_model), "--format", "json"])
    assert code == EXIT_OK
    [row] = json.loads(capsys.readouterr().out)
    assert row["model_sha256"] == file_sha256(tiny_onnx_model)
    assert main(["classify", str(image)]) == EXIT_ERROR  # the broken default is really used


def test_classify_without_model_or_default_names_both(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tmp_path / "absent.onnx")
    assert main(["classify", str(image)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "--model" in err and "absent.onnx" in err


def test_serve_config_takes_the_default_unless_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = tmp_path / "default.onnx"
    shipped.write_bytes(b"x")
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", shipped)
    base = {"incoming": tmp_path / "in", "reports": tmp_path / "out"}
    assert load_serve_config(None, {**base, "model": None}).model == shipped
    mine = tmp_path / "mine.onnx"
    assert load_serve_config(None, {**base, "model": mine}).model == mine
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tmp_path / "absent.onnx")
    with pytest.raises(ConfigError, match="no default model is shipped"):
        load_serve_config(None, {**base, "model": None})


def test_doctor_names_the_default(
    tiny_onnx_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from xrwatch.cli.doctor_cmd import default_model_check

    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tiny_onnx_model)
    check = default_model_check()
    assert check.status == "ok" and "tinycnn" in check.value
    assert file_sha256(tiny_onnx_model)[:12] in check.value
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tmp_path / "absent.onnx")
    assert default_model_check().status == "warn"


def test_shipped_model_matches_its_card() -> None:
    shipped, card = defaults.DEFAULT_MODEL, defaults.DEFAULT_CARD
    assert shipped.is_file() and card.is_file(), "default.onnx and default.md come together"
    assert defaults.card_sha256() == file_sha256(shipped)
    assert shipped.stat().st_size < 30e6
    from xrwatch.modelmeta import read_model_metadata

    meta = read_model_metadata(shipped)
    text = card.read_text(encoding="utf-8")
    assert meta.arch in text and "Not a medical device" in text
    # who it is for, and what it is not for, said plainly
    assert meta.classes == ("Normal", "Bacteria", "Virus")
    assert "## Population" in text and "Children aged 1-5" in text and "## Not for" in text
    assert meta.population is not None and meta.population["output"] == "population"
    assert f"`population` >= {meta.population['threshold']}" in text
    # the input contract, stated in the file and in the card
    assert meta.input is not None and meta.input["range"] == [0.0, 1.0]
    assert "## Input contract" in text and "inside the graph" in text
    # heatmaps that localise: a grid of at least 7 x 7
    assert meta.cam is not None and min(meta.cam["shape"][1:]) >= 7
    assert "## Heatmaps" in text
    # the temperature the file carries is the one the card states, with its reason
    assert meta.calibration is not None
    t = float(meta.calibration["temperature"])
    assert f"Temperature shipped: **{t:.3f}**" in text
    assert meta.calibration["temperature_reason"] in text
    # the low_confidence threshold the file carries was chosen on the calibration split (not
    # the old fixed 0.5) and the card states it with its rates on each held-out set
    low = float(meta.calibration["low_confidence"])
    flat = " ".join(text.split())  # the card wraps its prose
    assert f"calibrated top probability is below **{low:.2f}**" in flat
    assert "## Low-confidence flag" in text and "chosen on the calibration split" in flat
    rows = re.findall(r"^\| (ALL held-out[^|]*) \| (\d+) \| (\d+) \| ([\d.]+) % \|", text, re.M)
    assert len(rows) == 2, "wrong predictions flagged, per held-out set"
    # the guard's and the gate's measured rates
    assert "## Scope guard" in text and "non-chest images caught" in text
    assert "## Population gate" in text and "adult/ held-out patients" in text
    # the weights hash verifies a rebuild
    m = re.search(r"its weights \(ONNX initializers.*?`([0-9a-f]{64})`", text, re.S)
    assert m, "the card states the weights' sha256"
    pytest.importorskip("onnx")
    from xrwatch_export.contract import weights_sha256

    assert weights_sha256(shipped) == m.group(1)


def test_doctor_states_the_population_a_model_is_for(tiny_onnx_model: Path) -> None:
    from dataclasses import replace

    from xrwatch.cli.doctor_cmd import population_check
    from xrwatch.modelmeta import read_model_metadata

    meta = read_model_metadata(tiny_onnx_model)
    assert population_check(meta).status == "warn"  # no population gate stated
    gated = replace(meta, population={"population": "children aged 1-5", "threshold": 0.5,
                                      "adult_age_years": 18, "output": "population"})  # fmt: skip
    check = population_check(gated)
    assert check.status == "ok"
    assert "children aged 1-5" in check.value and "not for adults" in check.value
    assert "out_of_population" in check.value
