"""Training throughput: model images/s, data-pipeline images/s, and the projected wall time
of ``xrwatch reproduce`` at the real dataset's size.

    .venv/bin/python benchmarks/train_throughput.py                  # this machine, CPU/GPU auto
    .venv/bin/python benchmarks/train_throughput.py --device cuda --batch-size 64

Measures, at the study's 224 px unless told otherwise:

1. training images/s (forward + backward + Adam step, with the on-device flips/rotation) of
   ResNet50 and DenseNet121; AMP (bf16/fp16) and channels-last on CUDA, as in training;
2. inference images/s (the per-epoch validation and test passes);
3. data pipeline images/s: decoding full-size JPEGs through ``load_model_input`` (what the
   cache does once, in parallel worker processes) versus gathering batches from the cache;
4. the projection for ``xrwatch reproduce``: 5,286 TRAIN images × 20 epochs × 6 experiments
   (4 ResNet50, 2 DenseNet121) plus validation/test passes and one cache build.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xrwatch.preprocess import PreprocessSpec
from xrwatch.sysinfo import describe
from xrwatch_training.cache import build_cache
from xrwatch_training.engine import (
    Dist,
    SplitTensors,
    augment,
    evaluate,
    grad_scaler,
    train_one_epoch,
)
from xrwatch_training.losses import build_loss
from xrwatch_training.models import build_model, wrap
from xrwatch_training.presets import TrainConfig
from xrwatch_training.synth import synth_image

TRAIN_IMAGES = 5286  # CoronaHack TRAIN rows (5,284 once the 2 ARDS images are left out)
EVAL_IMAGES = 624 + 529  # official TEST + a 10 % validation split, every epoch
EPOCHS, EXPERIMENTS = 20, {"resnet50": 4, "densenet121": 2}
ROUNDS = 3  # each figure is the best of three timed rounds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_rate(fn: Callable[[], object], items: int, device: torch.device) -> float:
    """Items per second of the fastest of ROUNDS timed calls (other jobs only slow one down)."""
    best = float("inf")
    for _ in range(ROUNDS):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return items / best


def model_rates(
    arch: str, device: torch.device, size: int, batch: int, steps: int
) -> dict[str, float]:
    """Images/s of the training loop's own epoch and evaluation functions on random data."""
    cfg = TrainConfig(
        arch=arch,  # type: ignore[arg-type]
        weights="none",
        image_size=size,
        batch_size=batch,
        max_steps_per_epoch=steps,
        progress=False,
    )
    model = wrap(build_model(arch, 4), PreprocessSpec(size=size).to_dict()).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = grad_scaler(device, cfg)
    loss_fn = build_loss("ce", 4).to(device)
    n = batch * steps
    data = SplitTensors(
        torch.rand(n, 1, size, size, device=device, dtype=torch.float16),
        torch.randint(0, 4, (n,), device=device),
    )
    gen = torch.Generator().manual_seed(0)

    def epoch() -> None:  # AMP, channels-last and the on-device augmentation, as in training
        train_one_epoch(model, data, loss_fn, opt, scaler, cfg, device, Dist(), 1, 4, gen, None)

    def infer() -> None:  # eval mode, batches of 2 x batch, probabilities back on the CPU
        evaluate(model, data, loss_fn, cfg, device, Dist())

    epoch()  # warm-up (cuDNN autotuning, allocator)
    train_rate = _best_rate(epoch, n, device)
    infer()  # warm-up: eval-mode kernels are chosen on first use
    infer_rate = _best_rate(infer, n, device)
    return {"train_images_per_s": train_rate, "inference_images_per_s": infer_rate}


def data_rates(
    size: int, n_files: int, source_px: int, workers: int, batch: int
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        from PIL import Image

        paths = []
        for i in range(n_files):  # full-size JPEGs, like Kermany's ~1-2 kpx originals
            p = root / f"img{i}.jpeg"
            Image.fromarray(synth_image("Bacteria", source_px, rng), mode="L").save(p, quality=92)
            paths.append(p)
        spec = PreprocessSpec(size=size)
        rounds = itertools.count()

        def decode(n_workers: int) -> Callable[[], object]:
            # a fresh cache folder each round, so every round decodes every file
            return lambda: build_cache(paths, spec, root / f"c{next(rounds)}", workers=n_workers)

        cpu = torch.device("cpu")
        one_worker = _best_rate(decode(1), n_files, cpu)
        parallel = _best_rate(decode(workers), n_files, cpu)
        cache = build_cache(paths, spec, root / "c0", workers=1)  # a cache hit
        cfg = TrainConfig(image_size=size)
        gen = torch.Generator().manual_seed(0)
        images = torch.from_numpy(np.array(cache.images)).unsqueeze(1)

        def serve() -> None:
            for _ in range(20):
                idx = torch.randint(0, n_files, (batch,), generator=gen)
                augment(images[idx].float(), cfg, gen)

        from_cache = _best_rate(serve, 20 * batch, cpu)
    return {
        "jpeg_decode_images_per_s_1_worker": one_worker,
        f"jpeg_decode_images_per_s_{workers}_workers": parallel,
        "cache_batches_images_per_s": from_cache,
    }


def projection(rates: dict[str, dict[str, float]], decode_rate: float) -> dict[str, float]:
    seconds = (TRAIN_IMAGES + EVAL_IMAGES) / decode_rate  # the cache is built once
    for arch, n in EXPERIMENTS.items():
        r = rates[arch]
        per_epoch = (
            TRAIN_IMAGES / r["train_images_per_s"] + EVAL_IMAGES / r["inference_images_per_s"]
        )
        seconds += n * EPOCHS * per_epoch
    return {"reproduce_projected_minutes": seconds / 60}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=0, help="default: 32 on CUDA, 8 on CPU")
    ap.add_argument(
        "--steps", type=int, default=0, help="steps per round (default: 20 CUDA, 3 CPU)"
    )
    ap.add_argument("--files", type=int, default=256, help="full-size JPEGs to decode")
    ap.add_argument("--source-px", type=int, default=1500, help="side of those JPEGs")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    print(describe())  # the CPU, its ISA features and ONNX Runtime: what the figures need
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    batch = args.batch_size or (32 if cuda else 8)
    steps = args.steps or (20 if cuda else 3)
    name = (
        torch.cuda.get_device_name(0)
        if cuda
        else f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    )
    result: dict[str, Any] = {"device": name, "image_size": args.image_size, "batch_size": batch}
    result["models"] = {
        arch: model_rates(arch, device, args.image_size, batch, steps) for arch in EXPERIMENTS
    }
    result["data"] = data_rates(args.image_size, args.files, args.source_px, args.workers, batch)
    decode = result["data"][f"jpeg_decode_images_per_s_{args.workers}_workers"]
    result["projection"] = projection(result["models"], decode)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"device: {name}; {args.image_size} px; batch {batch}; AMP+channels-last: {cuda}")
    print("| model | train img/s | inference img/s |\n|---|---|---|")
    for arch, r in result["models"].items():
        print(f"| {arch} | {r['train_images_per_s']:.1f} | {r['inference_images_per_s']:.1f} |")
    print("\n| data pipeline | img/s |\n|---|---|")
    for key, value in result["data"].items():
        print(f"| {key} | {value:.1f} |")
    minutes = result["projection"]["reproduce_projected_minutes"]
    print(
        f"\nprojected `xrwatch reproduce` at full size ({TRAIN_IMAGES} TRAIN images x {EPOCHS} "
        f"epochs x 6 experiments): {minutes:.1f} min ({minutes / 60:.1f} h)"
    )


if __name__ == "__main__":
    main()
