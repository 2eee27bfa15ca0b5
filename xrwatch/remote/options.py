"""The ``--triton`` options shared by ``classify``, ``evaluate``, ``serve`` and ``doctor``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from xrwatch.errors import ConfigError
from xrwatch.filehash import file_sha256

if TYPE_CHECKING:
    from xrwatch.remote.triton import TritonEngine

logger = logging.getLogger(__name__)

TRITON_HELP = (
    "Run the model on Triton Inference Server(s) instead of here: grpc://HOST:PORT, "
    "several comma-separated (a batch goes to a ready one; a failing one is retried on "
    "another). Needs the 'triton' extra. With --model, the servers must serve that file "
    "(same sha256); it is not run here."
)
TRITON_MODEL_HELP = "The served model: NAME or NAME:VERSION (with --triton)."
DEFAULT_TRITON_MODEL = "xrwatch"


def triton_engine(
    urls: str,
    model_name: str,
    *,
    expected_model: Path | None = None,
    low_confidence: float | None = None,
    scope_guard: str = "combined",
    require_gpu: bool = False,
    retry_for: float | None = None,
) -> TritonEngine:
    """The engine for ``--triton URLS --triton-model NAME[:VERSION]``.

    ``expected_model``: a local copy of the exported file the servers must serve (its
    sha256 is compared with the served ``xrwatch.model_sha256``). Raises ``ConfigError``
    for bad options, ``ModelError`` when the fleet does not serve the expected model.
    """
    from xrwatch.remote.triton import DEFAULT_RETRY_FOR, TritonEngine, parse_model

    if require_gpu:
        raise ConfigError("--require-gpu does not apply with --triton (the servers run the model)")
    name, version = parse_model(model_name)
    expect = None
    if expected_model is not None:
        if not expected_model.is_file():
            raise ConfigError(f"{expected_model}: model file not found")
        expect = file_sha256(expected_model)
    return TritonEngine(
        urls,
        name,
        version=version,
        expect_sha256=expect,
        low_confidence=low_confidence,
        scope_guard=scope_guard,
        retry_for=DEFAULT_RETRY_FOR if retry_for is None else retry_for,
    )
