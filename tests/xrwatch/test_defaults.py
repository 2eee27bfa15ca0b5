"""The shipped default model: lookup when --model is absent, explicit --model wins, and the
shipped file matches its model card."""

from __future__ import annotations

import json
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
    # what the heatmap is and is not, the calibration figures and the guard's measured rates
    if meta.cam is not None:
        assert "## Heatmaps" in text and "not a segmentation" in text
    if meta.calibration is not None:
        assert f"T = {float(meta.calibration['temperature']):.4f}" in text
        rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
        for split, ece in meta.calibration["ece"].items():
            row = rows[f"| {split}"]
            assert row.startswith(f"| {split} | {ece['n']} | {ece['before']:.4f}"), row
            assert f"| {ece['after']:.4f}" in row, row
    if meta.guard is not None:
        assert "## Scope guard" in text
        assert "flagged `out_of_scope`" in text and "non-chest images caught" in text
        assert "no out-of-distribution check" not in text


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
