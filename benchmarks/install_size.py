"""How much disk a virtual environment takes, and how much of it is CUDA.

    python benchmarks/install_size.py .venv [more venvs...]

Prints, for each environment, the total size of its site-packages, the part that only a
GPU uses (the NVIDIA CUDA/cuDNN/NCCL wheels, triton, torch's CUDA libraries, onnxruntime's
CUDA/TensorRT providers) and the largest packages. The README's install sizes are its
output.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GPU_DIRS = ("nvidia", "triton", "cuda", "cusparselt", "nvshmem")  # whole folders: GPU only
GPU_FILE_MARKERS = ("cuda", "cudnn", "cublas", "nccl", "tensorrt", "nvrtc", "cufft", "cusparse")


def _size(path: Path) -> int:
    if path.is_symlink():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def _gpu_only(entry: Path) -> int:
    """Bytes of ``entry`` (a site-packages top-level item) that only a GPU uses."""
    if entry.name.split("-")[0].split("_")[0] in GPU_DIRS or entry.name in GPU_DIRS:
        return _size(entry)
    if not entry.is_dir() or entry.name.endswith((".dist-info", ".data")):
        return 0
    total = 0
    for root, _, files in os.walk(entry):
        for name in files:
            low = name.lower()
            if (".so" in low or low.endswith(".dll")) and any(m in low for m in GPU_FILE_MARKERS):
                total += os.path.getsize(os.path.join(root, name))
    return total


def report(venv: Path, top: int) -> None:
    sites = sorted(venv.glob("lib/python3*/site-packages"))
    if not sites:
        sys.exit(f"{venv}: no lib/python3*/site-packages here (not a virtual environment?)")
    site = sites[0]
    sizes = {e.name: _size(e) for e in site.iterdir()}
    gpu = sum(_gpu_only(e) for e in site.iterdir())
    total = sum(sizes.values())
    gib = 1024**3
    print(f"{venv}: site-packages {total / gib:.2f} GiB, of which GPU-only {gpu / gib:.2f} GiB")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {size / 1024**2:8.0f} MiB  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venvs", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=8, help="largest packages to list")
    args = parser.parse_args()
    for venv in args.venvs:
        report(venv, args.top)


if __name__ == "__main__":
    main()
