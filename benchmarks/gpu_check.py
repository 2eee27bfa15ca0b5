"""Everything a CUDA machine must show, in one command of under 8 minutes.

    .venv/bin/python benchmarks/gpu_check.py                       # prints a report
    .venv/bin/python benchmarks/gpu_check.py --checkpoint runs/real/runs/RCE-resnet50-64/best.pt

1. ONNX Runtime really runs on the CUDA execution provider (``xrwatch.engine`` with
   ``require_gpu=True``, so a silent CPU fallback fails the check), for the fp32 and the
   fp16 export of a ResNet50, and agrees with the CPU provider (max |Δp|, top-1).
2. Training throughput with AMP (bf16/fp16) and channels-last, ResNet50 and DenseNet121,
   224 px, through the training loop's own functions (``benchmarks/train_throughput.py``).
3. The projected wall time of the full six-experiment reproduction from those rates.
4. A short real-subset training on the GPU (ResNet50 from scratch, 224 px, ``--epochs``
   epochs, patient-grouped split) with its wall time and validation figures.

Without a CUDA GPU it says so and exits 0 having measured nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FP32_PARITY = 1e-3  # max |Δp| CUDA fp32 vs CPU fp32 (TF32/cuDNN algorithms differ a little)
FP16_PARITY = 2e-2  # max |Δp| CUDA fp16 vs CPU fp32
DATA = ROOT.parent / "shared" / "data" / "xray" / "coronahack-subset"
IMAGES = ROOT.parent / "shared" / "data" / "xray" / "real"


def no_cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install 'xrwatch[train]')"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    from xrwatch.engine import cuda_unavailable_reason

    return cuda_unavailable_reason()


def provider_check(checkpoint: Path | None, work: Path) -> dict[str, Any]:
    """Export fp32 + fp16, run both on CUDA (required) and on the CPU, compare."""
    import numpy as np

    from tests.helpers.models import make_checkpoint
    from xrwatch.engine import CUDA_EP, InferenceEngine
    from xrwatch.inputs import expand_inputs
    from xrwatch.preprocess import load_model_input
    from xrwatch_export.pipeline import ExportOptions, export_model

    ckpt = checkpoint or make_checkpoint(work / "ckpt" / "best.pt", arch="resnet50", size=224)
    result = export_model(ExportOptions(source=ckpt, output=work / "model.onnx", fp16=True))
    spec = result.meta.spec
    files = expand_inputs([IMAGES])[:64] if IMAGES.is_dir() else []
    if files:
        batch = np.stack([load_model_input(p, spec)[0] for p in files]).astype(np.float32)
    else:
        batch = np.random.default_rng(0).random((32, spec.size, spec.size), dtype=np.float32)
    cpu_ref = InferenceEngine(result.variant("fp32").path, use_gpu=False).predict_arrays(batch)
    out: dict[str, Any] = {"images": len(batch), "source": "real" if files else "random"}
    for precision, bound in (("fp32", FP32_PARITY), ("fp16", FP16_PARITY)):
        engine = InferenceEngine(result.variant(precision).path, require_gpu=True)
        probs = engine.predict_arrays(batch)
        t = time.perf_counter()
        for _ in range(5):
            engine.predict_arrays(batch)
        ms = (time.perf_counter() - t) / 5 / len(batch) * 1000
        diff = float(np.abs(probs - cpu_ref).max())
        agree = float((probs.argmax(1) == cpu_ref.argmax(1)).mean())
        out[precision] = {
            "provider": engine.provider, "cuda": engine.provider == CUDA_EP,
            "max_abs_diff_vs_cpu_fp32": diff, "top1_agreement": agree,
            "parity_ok": diff <= bound, "bound": bound, "ms_per_image": ms,
        }  # fmt: skip
    return out


def throughput(batch: int, steps: int) -> dict[str, Any]:
    import torch
    from train_throughput import EXPERIMENTS, model_rates, projection

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    rates = {arch: model_rates(arch, device, 224, batch, steps) for arch in EXPERIMENTS}
    # decoding is done once into the cache, by CPU workers; 500 img/s is a conservative rate
    return {"rates": rates, **projection(rates, decode_rate=500.0)}


def short_training(epochs: int, work: Path) -> dict[str, Any]:
    from xrwatch_training.engine import train
    from xrwatch_training.presets import experiment_config

    cfg = experiment_config(
        "RCE",
        {"data": str(DATA), "split": "patient", "val_fraction": 0.15, "test_fraction": 0.2,
         "epochs": epochs, "image_size": 224, "device": "cuda", "out": str(work / "runs"),
         "name": "gpu-short", "progress": False},
    )  # fmt: skip
    t = time.perf_counter()
    run_dir = train(cfg)
    seconds = time.perf_counter() - t
    summary = json.loads((run_dir / "test_metrics.json").read_text(encoding="utf-8"))
    val = summary.get("val_at_best") or {}
    return {
        "epochs": epochs, "wall_seconds": seconds, "run_dir": str(run_dir),
        "val_accuracy": val.get("accuracy"), "val_balanced_accuracy": val.get("balanced_accuracy"),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="a real best.pt to export")
    ap.add_argument("--epochs", type=int, default=3, help="of the short real-subset training")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    reason = no_cuda_reason()
    if reason is not None:
        print(f"gpu_check: SKIPPED, nothing measured: {reason}. Run it on a CUDA machine.")
        return 0
    import torch

    work = args.workdir or Path(tempfile.mkdtemp(prefix="xrwatch-gpu-check-"))
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0)}
    t0 = time.perf_counter()
    report["onnxruntime"] = provider_check(args.checkpoint, work)
    report["training"] = throughput(args.batch_size, args.steps)
    if DATA.is_dir():
        report["short_real_training"] = short_training(args.epochs, work)
    report["total_seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"GPU: {report['gpu']}  (whole check {report['total_seconds']:.0f} s)")
        ort = report["onnxruntime"]
        print(f"\nONNX Runtime on {ort['images']} {ort['source']} images:")
        print("| precision | provider | max abs Δp vs CPU fp32 | top-1 agreement | ms/image |")
        print("|---|---|---|---|---|")
        for p in ("fp32", "fp16"):
            r = ort[p]
            print(
                f"| {p} | {r['provider']} | {r['max_abs_diff_vs_cpu_fp32']:.2e} "
                f"(bound {r['bound']:g}) | {r['top1_agreement']:.1%} | {r['ms_per_image']:.2f} |"
            )
        print(f"\nAMP training, 224 px, batch {args.batch_size}:")
        print("| model | train img/s | inference img/s |\n|---|---|---|")
        for arch, r in report["training"]["rates"].items():
            print(f"| {arch} | {r['train_images_per_s']:.0f} | {r['inference_images_per_s']:.0f} |")
        minutes = report["training"]["reproduce_projected_minutes"]
        print(f"\nprojected six-experiment reproduction (full CoronaHack): {minutes:.1f} min")
        if "short_real_training" in report:
            s = report["short_real_training"]
            print(f"\nreal-subset RCE, 224 px, {s['epochs']} epochs on the GPU: "
                  f"{s['wall_seconds']:.0f} s; val accuracy {s['val_accuracy']:.3f}, "
                  f"balanced {s['val_balanced_accuracy']:.3f}")  # fmt: skip
    ok = all(report["onnxruntime"][p]["cuda"] and report["onnxruntime"][p]["parity_ok"]
             for p in ("fp32", "fp16"))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
