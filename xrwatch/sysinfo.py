"""What a speed figure depends on: the CPU, its vector/matrix ISA features, ONNX Runtime.

int8 inference is several times faster with AVX-512 VNNI or AMX than with AVX2 alone, so
every benchmark prints :func:`describe` first and ``xrwatch doctor`` shows the same facts.
Torch-free; reads ``/proc/cpuinfo`` (Linux) and looks ONNX Runtime's version up without
importing it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# /proc/cpuinfo flag -> the name people know; in the order they matter for inference speed.
ISA_FEATURES: tuple[tuple[str, str], ...] = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512F"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("amx_tile", "AMX"),
)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    logical_cpus: int
    features: tuple[str, ...]  # names from ISA_FEATURES that are present
    missing: tuple[str, ...]  # names from ISA_FEATURES that are absent


def parse_cpuinfo(text: str) -> CpuInfo:
    """The CPU model and ISA features from the text of ``/proc/cpuinfo``."""
    model, flags, cpus = "", set[str](), 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            cpus += 1
        elif key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    present = tuple(name for flag, name in ISA_FEATURES if flag in flags)
    absent = tuple(name for flag, name in ISA_FEATURES if flag not in flags)
    return CpuInfo(model or platform.processor() or "unknown CPU", cpus, present, absent)


def cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            info = parse_cpuinfo(fh.read())
    except OSError:
        return CpuInfo(platform.processor() or "unknown CPU", os.cpu_count() or 0, (), ())
    if not info.logical_cpus:
        info = CpuInfo(info.model, os.cpu_count() or 0, info.features, info.missing)
    return info


def onnxruntime_version() -> str:
    """Installed ONNX Runtime distribution(s) and version, without importing it."""
    found = []
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found) or "not installed"


def describe_cpu(info: CpuInfo | None = None) -> str:
    """e.g. ``AMD EPYC, 2 logical CPUs; AVX2, AVX-512F, AVX-512 VNNI (no AVX-VNNI, AMX)``."""
    info = info or cpu_info()
    have = ", ".join(info.features) or "none of " + ", ".join(n for _, n in ISA_FEATURES)
    lacks = f" (no {', '.join(info.missing)})" if info.missing and info.features else ""
    return f"{info.model}, {info.logical_cpus} logical CPUs; {have}{lacks}"


def describe() -> str:
    """One line for the top of every benchmark's output."""
    return f"CPU: {describe_cpu()} | ONNX Runtime: {onnxruntime_version()}"
