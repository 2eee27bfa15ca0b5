"""``xrwatch demo``'s first part: the default model on the shipped real sample X-rays."""

from __future__ import annotations

from pathlib import Path

import pytest

from xrwatch import defaults
from xrwatch.cli._app import EXIT_OK, main
from xrwatch.cli.demo_cmd import SAMPLES_DIR, real_samples

CLASSES = {"Normal", "Bacteria", "Virus"}  # the paediatric default's classes


def test_samples_are_small_labelled_and_attributed() -> None:
    samples = real_samples()
    assert len(samples) == 6 and {label for _, label in samples} == CLASSES
    total = sum(p.stat().st_size for p, _ in samples)
    assert total < 500_000
    attribution = (SAMPLES_DIR / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for path, _ in samples:
        assert path.name in attribution
    assert "CC BY 4.0" in attribution and "COVID-19/" not in attribution


def test_real_demo_prints_predictions_beside_true_labels(
    tiny_onnx_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tiny_onnx_model)
    assert main(["demo", "--no-synthetic"]) == EXIT_OK
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "(true: " in line]
    assert len(lines) == 6
    assert all("predicted " in line for line in lines)
    assert "right" in out and "model card" in out


def test_real_demo_without_a_default_model_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tmp_path / "absent.onnx")
    assert main(["demo", "--no-synthetic"]) == 1
    assert "no default model" in capsys.readouterr().out
