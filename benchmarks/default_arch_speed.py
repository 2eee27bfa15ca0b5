"""Training cost per image of the default's candidate architectures on this machine.

    .venv/bin/python benchmarks/default_arch_speed.py --threads 1 2 --steps 4

One training step (PACS augmentation, forward, backward, Adam) of a batch of 32 random
224 x 224 inputs, per architecture and torch thread count; prints wall and CPU
milliseconds per image (median of ``--steps`` after one warm-up step). On a shared 2-core
machine a second thread can cost far more CPU than it saves (threads wait for each other
while the other core runs someone else's work): compare both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_cost(arch: str, threads: int, steps: int, batch: int = 32) -> tuple[float, float]:
    """(wall ms, CPU ms) per image of one training step, median over ``steps``."""
    import torch

    from xrwatch.preprocess import PreprocessSpec
    from xrwatch_training.models import build_model, wrap
    from xrwatch_training.pacs_augment import PacsAugment, pacs_augment

    torch.set_num_threads(threads)
    model = wrap(build_model(arch, 4), PreprocessSpec().to_dict())
    opt = torch.optim.Adam(model.parameters())
    x = torch.rand(batch, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 4, (batch,), generator=torch.Generator().manual_seed(1))
    g, aug = torch.Generator().manual_seed(2), PacsAugment()
    walls, cpus = [], []
    for i in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = torch.nn.functional.cross_entropy(model(pacs_augment(x, aug, g)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators and kernels
            walls.append((time.perf_counter() - t0) / batch * 1000)
            cpus.append((time.process_time() - c0) / batch * 1000)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["mobilenet_v3_small", "resnet18"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    from xrwatch.sysinfo import describe

    print(f"machine: {describe()}")
    for arch in args.archs:
        for threads in args.threads:
            wall, cpu = step_cost(arch, threads, args.steps)
            print(
                f"{arch:20s} threads {threads}: {wall:7.1f} ms/image wall, {cpu:7.1f} ms/image CPU"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
