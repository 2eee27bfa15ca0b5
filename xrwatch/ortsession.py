"""ONNX Runtime sessions for :class:`xrwatch.engine.InferenceEngine`: which execution provider.

Owns the provider choice - CUDA when a session can really be created with it (the build
has the provider, a driver loads, ``preload_dlls`` found CUDA/cuDNN), else CPU, with the
reason either way - the session options (thread counts, graph-optimisation level) and the
caveat for a provider other than the one export verified on. ``xrwatch doctor`` judges the
GPU with :func:`cuda_unavailable_reason`, as the engine does.

Never imports torch, ``onnx``, ``training`` or ``export``.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path
from typing import Any

from xrwatch.errors import ModelError, ProviderError
from xrwatch.logs import native_stderr_to_log, printed_to_log
from xrwatch.modelmeta import DEFAULT_GRAPH_OPTIMIZATION, ModelMeta, ort_optimization_level

logger = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


def _cuda_driver_present() -> bool:
    """Whether the CUDA driver library loads (avoids ORT's noisy failure when there is none)."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def cuda_unavailable_reason() -> str | None:
    """Why a CUDA session cannot be tried here, or None after making it as likely as possible.

    Checks the build and the driver, then calls ``onnxruntime.preload_dlls()`` (onnxruntime
    >= 1.21) so that CUDA/cuDNN from pip wheels are found. Shared by the engine and
    ``xrwatch doctor`` so both judge the GPU the same way.
    """
    import onnxruntime as ort

    if CUDA_EP not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA execution provider"
    if not _cuda_driver_present():
        return "no CUDA driver (libcuda) on this machine"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            with printed_to_log():
                preload()
        except Exception as exc:  # best effort; the session attempt decides
            logger.debug("onnxruntime.preload_dlls() failed: %s", exc)
    return None


def session_options(
    intra_op_threads: int, inter_op_threads: int, level: str = DEFAULT_GRAPH_OPTIMIZATION
) -> Any:
    """``onnxruntime.SessionOptions`` with these thread counts and optimisation level."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # 0 = ONNX Runtime's default (all cores)
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = ort_optimization_level(level)
    return options


def optimization_caveat(meta: ModelMeta, provider: str) -> str | None:
    """Why results may differ from the ones export verified, or None.

    Export verifies on ONNX Runtime's CPU provider at ``meta.graph_optimization``; serving
    uses that level, but another provider has other kernels and fusions, which matters
    for int8 (some top-1 answers change).
    """
    if provider == CPU_EP or meta.precision != "int8":
        return None
    return (
        f"{meta.path}: this int8 model was verified on {CPU_EP} at graph optimisation level "
        f"{meta.graph_optimization!r}; on {provider} its results may differ from the verified "
        "ones (some top-1 answers can change); use --cpu, or the fp32/fp16 model on a GPU"
    )


def create_session(
    path: Path, *, want_gpu: bool, require_gpu: bool, options: Any
) -> tuple[Any, str]:
    """An ``InferenceSession`` on CUDA when it really works there, else CPU; and why."""
    import onnxruntime as ort

    reason = "GPU not requested"
    if want_gpu or require_gpu:
        unavailable = cuda_unavailable_reason()
        if unavailable is not None:
            reason = unavailable
        else:
            try:
                with native_stderr_to_log():
                    session = ort.InferenceSession(str(path), options, providers=[CUDA_EP, CPU_EP])
            except Exception as exc:
                raise ModelError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
            if session.get_providers()[0] == CUDA_EP:
                return session, "CUDA available"
            reason = "the CUDA execution provider could not be created (see ONNX Runtime log)"
            if not require_gpu:
                return session, reason  # ONNX Runtime already fell back to the CPU
        if require_gpu:
            raise ProviderError(f"{path}: a GPU was required but cannot be used: {reason}")
    try:
        with native_stderr_to_log():
            session = ort.InferenceSession(str(path), options, providers=[CPU_EP])
    except Exception as exc:
        raise ModelError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
    return session, reason
