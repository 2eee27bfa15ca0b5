"""The ``--triton`` options shared by ``classify``, ``evaluate``, ``serve`` and ``doctor``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

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
DoctorStatus = Literal["ok", "fail"]


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


def triton_doctor_rows(urls: str, model_name: str) -> list[tuple[str, str, str, DoctorStatus]]:
    """``doctor --triton``: one ``(section, item, value, status)`` row per server - ready,
    which model it serves, one real inference and its time - and one for the fleet."""
    import importlib.util
    import time

    import numpy as np

    from xrwatch.errors import XRWatchError
    from xrwatch.remote.triton import TritonFleet, parse_model, parse_urls

    section = "triton"
    if importlib.util.find_spec("tritonclient") is None:
        return [(section, "tritonclient", "not installed: pip install 'xrwatch[triton]'", "fail")]
    try:
        servers = parse_urls(urls)
        name, version = parse_model(model_name)
    except ConfigError as exc:
        return [(section, "options", str(exc), "fail")]
    rows: list[tuple[str, str, str, DoctorStatus]] = []
    served: dict[str, set[str]] = {}
    for url in servers:
        try:
            fleet = TritonFleet([url], name, version=version, timeout=10.0, retry_for=0.0)
        except XRWatchError as exc:
            rows.append((section, f"grpc://{url}", f"unusable: {exc}", "fail"))
            continue
        try:
            meta = fleet.meta
            size = meta.spec.size
            started = time.monotonic()
            fleet.run(["probabilities"], {"image": np.zeros((1, 1, size, size), np.float32)})
            took = (time.monotonic() - started) * 1000.0
        except XRWatchError as exc:
            rows.append(
                (section, f"grpc://{url}", f"serves {name} but cannot infer: {exc}", "fail")
            )
            continue
        finally:
            fleet.close()
        served.setdefault(f"{fleet.version} {meta.model_sha256}", set()).add(url)
        rows.append(
            (
                section,
                f"grpc://{url}",
                f"ready: {name} version {fleet.version} ({meta.name}, classes "
                f"{', '.join(meta.classes)}, input {size} px, sha256 {meta.model_sha256[:12]}); "
                f"one image in {took:.0f} ms",
                "ok",
            )
        )
    if len(served) > 1:
        rows.append((section, "fleet", f"servers serve different models: {served}", "fail"))
    elif served and len(servers) > 1:
        rows.append((section, "fleet", f"{len(servers)} servers, one model", "ok"))
    return rows
