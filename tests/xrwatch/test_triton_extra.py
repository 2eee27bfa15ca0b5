"""Without the 'triton' extra: a helpful message, never a traceback; nothing imported early."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from xrwatch.cli._app import EXIT_ERROR, main

SAMPLES = Path(__file__).resolve().parents[2] / "xrwatch" / "samples"


def test_missing_extra_is_a_usage_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name.split(".")[0] == "tritonclient" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    code = main(["classify", str(SAMPLES), "--triton", "grpc://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert "pip install 'xrwatch[triton]'" in err and "tritonclient" in err, err
    assert "Traceback" not in err


def test_bad_triton_options_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--triton", "http://gpu:8000"],
        ["--triton", "grpc://gpu:8001", "--triton-model", "xrwatch:latest"],
        ["--triton", "grpc://gpu:8001", "--require-gpu"],
    ):
        code = main(["classify", str(SAMPLES), *argv])
        err = capsys.readouterr().err
        assert code == EXIT_ERROR, argv
        assert "--triton" in err or "--require-gpu" in err, err


def test_the_remote_modules_import_neither_torch_nor_tritonclient() -> None:
    code = (
        "import sys, xrwatch.remote.triton, xrwatch.remote.options, xrwatch.remote.repository, "
        "xrwatch.remote.localserver, xrwatch.cli.classify_cmd; "
        "print(sorted(m for m in ('torch', 'tritonclient', 'grpc') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
