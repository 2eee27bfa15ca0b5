"""The serving import path never loads torch (nor training/export)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import xrwatch
    from xrwatch.cli import commands  # registers every command
    # every module of the serving package, each must import (no ImportError swallowed)
    for info in pkgutil.walk_packages(xrwatch.__path__, "xrwatch."):
        importlib.import_module(info.name)
    from xrwatch.cli import main
    try:
        code = main(["--help"])
    except SystemExit as exc:
        code = exc.code
    assert code in (0, None), f"xrwatch --help exited {code}"
    heavy = ("torch", "torchvision", "xrwatch_training", "xrwatch_export")
    heavy += ("onnx", "sklearn", "matplotlib")
    loaded = sorted(m for m in heavy if m in sys.modules)
    print("LOADED:" + ",".join(loaded))
    """
)


def test_serving_path_does_not_import_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "inspect" in result.stdout and "doctor" in result.stdout  # the help listed them
    loaded = [ln for ln in result.stdout.splitlines() if ln.startswith("LOADED:")]
    assert loaded == ["LOADED:"], loaded  # nothing of the train extra, nor training/export


def test_console_script_help_runs_without_torch() -> None:
    probe = (
        "import sys, runpy; sys.argv = ['xrwatch', '--help']\n"
        "try:\n    runpy.run_module('xrwatch', run_name='__main__')\n"
        "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr + result.stdout
