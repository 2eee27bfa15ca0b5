"""xrwatch.sysinfo: the CPU line every benchmark and `xrwatch doctor` print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xrwatch.sysinfo import describe, describe_cpu, parse_cpuinfo

ROOT = Path(__file__).resolve().parents[2]

VNNI_CPU = """processor\t: 0
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16

processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16
"""
AVX2_CPU = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_vnni_cpu() -> None:
    info = parse_cpuinfo(VNNI_CPU)
    assert info.model == "AMD EPYC 9654 96-Core Processor"
    assert info.logical_cpus == 2
    assert info.features == ("AVX2", "AVX-512F", "AVX-512 VNNI", "AVX-512 BF16")
    assert "AMX" in info.missing
    assert "AVX-512 VNNI" in describe_cpu(info) and "no AVX-VNNI, AMX" in describe_cpu(info)


def test_avx2_only_cpu_says_what_it_lacks() -> None:
    line = describe_cpu(parse_cpuinfo(AVX2_CPU))
    assert line.startswith("Intel(R) Xeon(R) CPU E5-2690 v4")
    assert "AVX2 (no AVX-512F, AVX-512 VNNI" in line


def test_describe_names_onnxruntime() -> None:
    assert "ONNX Runtime: onnxruntime" in describe()


@pytest.mark.parametrize("script", ["decode.py", "inference.py", "serve.py", "train_throughput.py"])
def test_every_benchmark_prints_the_cpu(script: str) -> None:
    source = (ROOT / "benchmarks" / script).read_text()
    assert "xrwatch.sysinfo import describe" in source and "print(describe" in source


def test_sysinfo_imports_no_onnxruntime() -> None:
    code = "import sys, xrwatch.sysinfo as s; s.describe(); print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
