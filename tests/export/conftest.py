"""Fixtures for the export tests: checkpoints with random weights, one full export.

The export tests need the ``train`` extra (torch, onnx); without it they are not collected.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnx") is None:
    collect_ignore_glob = ["test_*.py"]  # serving-only install: nothing to export with


@pytest.fixture(scope="session")
def full_export(tmp_path_factory: pytest.TempPathFactory, shared_xray: Path) -> Any:
    """tinycnn at 64 px: fp32 verified on the real images, int8, fp16, card and Triton."""
    from tests.helpers.models import make_checkpoint
    from xrwatch_export.pipeline import ExportOptions, export_model

    root = tmp_path_factory.mktemp("full_export")
    ckpt = make_checkpoint(root / "runs" / "r1" / "best.pt", size=64, seed=3)
    real = shared_xray / "real"
    return export_model(
        ExportOptions(
            source=ckpt.parent,
            output=root / "out" / "model.onnx",
            verify_images=(real,),
            int8=True,
            calibration=(real,),
            min_int8_agreement=0.9,
            fp16=True,
            triton=root / "triton",
        )
    )
