"""Inference speed: torch eager vs ONNX Runtime fp32 vs int8, ResNet50 and DenseNet121.

One run measures, per architecture and batch size, milliseconds per image (median of
``--repeats`` timed runs after warm-up) for

* torch eager (the checkpoint's ``NormalizedClassifier``, ``torch.inference_mode``),
* ONNX Runtime fp32 (the file ``xrwatch export`` writes, CPU provider),
* ONNX Runtime int8 (``--int8``: static QDQ, per-channel, calibrated on real images),

with the same thread count for all three, and prints the ratios. It also reports int8
top-1 agreement with fp32 on the real images in ``--images`` (default
``../shared/data/xray/real``). Calibration uses every other image; agreement is given on
the held-out half and on all of them.

Agreement only means something for a model whose predictions vary. Random weights put
every image in the same class, so by default each network is first trained briefly, from
scratch (Adam), on those same real images: ``--train-epochs`` at ``--train-size`` px, then
``--final-epochs`` at the export size so BatchNorm statistics fit it. That model is not a
classifier anyone should use; it only has image-dependent decision boundaries - and, being
barely trained, many images close to them, where int8 rounding flips the top-1 class. The
agreement is therefore also given on "decisive" images (fp32 top-2 margin >= 0.1). Pass
``--checkpoint ARCH=best.pt`` to measure a properly trained checkpoint instead.

    .venv/bin/python benchmarks/inference.py                    # 15-25 min on 2 CPU cores
    .venv/bin/python benchmarks/inference.py --archs resnet50 --train-epochs 0 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from xrwatch.engine import expand_inputs  # noqa: E402
from xrwatch.preprocess import PreprocessSpec, load_model_input  # noqa: E402
from xrwatch.sysinfo import describe  # noqa: E402
from xrwatch_export.pipeline import ExportOptions, export_model  # noqa: E402
from xrwatch_export.quantize import quantize_int8  # noqa: E402
from xrwatch_training.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint  # noqa: E402
from xrwatch_training.models import build_model, model_from_checkpoint, wrap  # noqa: E402

logger = logging.getLogger("benchmarks.inference")

ROUNDS = 3  # timing rounds; each times every runner in turn
SETTLE_SECONDS = 0.5  # pause before each timed block (spinning worker threads go idle)
DECISIVE_MARGIN = 0.1  # fp32 top-2 probability margin above which a flip is a real error
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "xray" / "real"


def load_images(folder: Path, spec: PreprocessSpec) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Every labelled image under ``folder/<Class>/``: paths, inputs N x 1 x S x S, labels."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    paths, arrays, labels = [], [], []
    for path in expand_inputs([folder]):
        arrays.append(load_model_input(path, spec)[0][None])
        labels.append(classes.index(path.parent.name))
        paths.append(path)
    return paths, np.stack(arrays).astype(np.float32), np.array(labels)


def train_briefly(
    arch: str,
    classes: list[str],
    spec: PreprocessSpec,
    stages: list[tuple[np.ndarray, int]],
    y: np.ndarray,
    out: Path,
) -> Path:
    """A from-scratch model trained on the images; see the module docstring.

    ``stages`` are ``(inputs, epochs)`` run in order: most epochs at a reduced resolution
    (what makes this affordable on a CPU), then a short stage at ``spec.size`` so that the
    BatchNorm statistics and filters fit the resolution the model is exported at.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    backbone = build_model(arch, len(classes))
    model = wrap(backbone, spec.to_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    yt = torch.from_numpy(y)
    acc, total = float("nan"), sum(epochs for _, epochs in stages)
    done = 0
    for x, epochs in stages:
        xt = torch.from_numpy(x)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(xt), generator=gen)
            start = time.perf_counter()
            for i in range(0, len(order), 16):
                idx = order[i : i + 16]
                loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.inference_mode():
                pred = torch.cat([model(xt[i : i + 32]).argmax(1) for i in range(0, len(xt), 32)])
            acc = float((pred == yt).float().mean())
            done += 1
            logger.info(
                "%s epoch %d/%d at %d px: loss %.3f, accuracy on the (training) images %.3f, "
                "%.0f s",
                arch,
                done,
                total,
                x.shape[-1],
                loss.item(),
                acc,
                time.perf_counter() - start,
            )
    metrics = {"val": {"accuracy": acc, "balanced_accuracy": acc}, "test": None}
    ckpt = make_checkpoint(
        arch=arch,
        classes=classes,
        task="multiclass",
        experiment="benchmark",
        preprocess=spec,
        config={"benchmark": "inference", "arch": arch, "epochs": total},
        model_state=backbone.state_dict(),
        optimizer_state=None,
        scheduler_state=None,
        scaler_state=None,
        epoch=total,
        metrics=metrics,
        best_val_balanced_accuracy=acc,
    )
    return save_checkpoint(ckpt, out)


def time_per_image(
    runs: dict[str, Callable[[np.ndarray], object]],
    batch: np.ndarray,
    repeats: int,
    rounds: int = ROUNDS,
) -> dict[str, float]:
    """Median milliseconds per image of each runner over ``rounds`` x ``repeats`` runs.

    Each round times every runner in turn, ``repeats`` consecutive runs after one warm-up,
    so a change in machine load affects all of them alike. Before each block we pause:
    torch's OpenMP threads and ONNX Runtime's pool keep spinning for a while after a run,
    and would otherwise steal the cores from the next runner.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            time.sleep(SETTLE_SECONDS)
            run(batch)
            for _ in range(repeats):
                start = time.perf_counter()
                run(batch)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 / len(batch) for name, t in times.items()}


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_time_shares(path: Path, batch: np.ndarray, threads: int, runs: int = 5) -> dict[str, float]:
    """Share of node time per operator type, from ONNX Runtime's own profiler."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {"image": batch})
    events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and "op_name" in event.get("args", {}):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + float(event.get("dur", 0))
    whole = sum(totals.values()) or 1.0
    return {op: t / whole for op, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def ort_probs(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [session.run(["probabilities"], {"image": x[i : i + 16]})[0] for i in range(0, len(x), 16)]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "densenet121"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per block")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--train-epochs", type=int, default=8, help="at --train-size")
    parser.add_argument("--train-size", type=int, default=112, help="reduced training resolution")
    parser.add_argument("--final-epochs", type=int, default=1, help="then at --size")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="ARCH=PATH")
    parser.add_argument(
        "--no-bn-float-variant",
        dest="bn_float_variant",
        action="store_false",
        help="skip timing DenseNet int8 without the BatchNorm rewrite",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep models here")
    args = parser.parse_args()
    print(describe())  # the CPU, its ISA features and ONNX Runtime: what the figures need
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnxscript", "onnx_ir", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    given = dict(item.split("=", 1) for item in args.checkpoint)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="xrwatch-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    spec = PreprocessSpec(size=args.size)
    paths, x, y = load_images(args.images, spec)
    classes = sorted(p.name for p in args.images.iterdir() if p.is_dir())
    calib_dir = work / "calibration"  # every other image, as symlinks (never copies)
    calib_dir.mkdir(exist_ok=True)
    for i, path in enumerate(paths[::2]):
        link = calib_dir / f"{i:03d}{path.suffix}"
        if not link.exists():
            link.symlink_to(path.resolve())
    held_out = np.arange(len(paths)) % 2 == 1

    rows: list[tuple[str, int, float, float, float]] = []
    agreements: list[tuple[str, float, float, float, int, float, float, dict[str, int], str]] = []
    extra: list[tuple[int, float, float, float]] = []
    profiles: dict[str, dict[str, float]] = {}
    x_train: np.ndarray | None = None
    for arch in args.archs:
        if arch in given:
            ckpt_path = Path(given[arch])
            trained = f"checkpoint {ckpt_path}"
        elif args.train_epochs > 0:
            if x_train is None:
                x_train = load_images(args.images, PreprocessSpec(size=args.train_size))[1]
            stages = [(x_train, args.train_epochs), (x, args.final_epochs)]
            ckpt_path = train_briefly(arch, classes, spec, stages, y, work / arch / "best.pt")
            trained = (
                f"trained from scratch on the same {len(x)} images, {args.train_epochs} epochs "
                f"at {args.train_size} px + {args.final_epochs} at {args.size} px "
                "(not a usable classifier; see docstring)"
            )
        else:
            ckpt_path = work / arch / "best.pt"
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            model0 = build_model(arch, len(classes))
            save_checkpoint(
                make_checkpoint(
                    arch=arch,
                    classes=classes,
                    task="multiclass",
                    experiment="benchmark",
                    preprocess=spec,
                    config={},
                    model_state=model0.state_dict(),
                    optimizer_state=None,
                    scheduler_state=None,
                    scaler_state=None,
                    epoch=0,
                    metrics={"val": None, "test": None},
                    best_val_balanced_accuracy=0.0,
                ),
                ckpt_path,
            )
            trained = "random weights (agreement meaningless)"
        out = work / arch / "model.onnx"
        start = time.perf_counter()
        result = export_model(
            ExportOptions(
                source=ckpt_path,
                output=out,
                verify_images=(args.images,),
                int8=True,
                calibration=(calib_dir,),
                min_int8_agreement=0.0,
                card=False,
            )
        )
        logger.info("%s exported and verified in %.0f s", arch, time.perf_counter() - start)
        model = model_from_checkpoint(load_checkpoint(ckpt_path))
        fp32 = ort_session(out, args.threads)
        int8 = ort_session(result.variant("int8").path, args.threads)
        p32, p8 = ort_probs(fp32, x), ort_probs(int8, x)
        # labels in the model's own class order (a trained checkpoint's need not be sorted)
        model_classes = list(result.meta.classes)
        y_model = np.array([model_classes.index(classes[i]) for i in y])
        same = p32.argmax(1) == p8.argmax(1)
        top2 = np.sort(p32, axis=1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) >= DECISIVE_MARGIN
        fp32_pred = np.bincount(p32.argmax(1), minlength=len(model_classes))
        agreements.append(
            (
                arch,
                float(same[held_out].mean()),
                float(same.mean()),
                float(same[decisive].mean()) if decisive.any() else float("nan"),
                int(decisive.sum()),
                float(np.median(top2[:, 1] - top2[:, 0])),
                float((p32.argmax(1) == y_model).mean()),
                dict(zip(model_classes, fp32_pred.tolist(), strict=True)),
                trained,
            )
        )

        def torch_run(batch: np.ndarray, model: torch.nn.Module = model) -> object:
            with torch.inference_mode():
                return model(torch.from_numpy(batch))

        runners: dict[str, Callable[[np.ndarray], object]] = {
            "torch": torch_run,
            "fp32": lambda b, s=fp32: s.run(None, {"image": b}),
            "int8": lambda b, s=int8: s.run(None, {"image": b}),
        }
        if arch == "densenet121" and args.bn_float_variant:
            plain = out.with_name("model.int8-bn-float.onnx")
            quantize_int8(out, plain, x[::2], rewrite_batchnorm=False)  # = calib_dir
            runners["int8 bn-float"] = lambda b, s=ort_session(plain, args.threads): s.run(
                None, {"image": b}
            )
            one = np.ascontiguousarray(x[:1])
            profiles = {
                "BatchNorm left float": op_time_shares(plain, one, args.threads),
                "BatchNorm as depthwise conv": op_time_shares(
                    result.variant("int8").path, one, args.threads
                ),
            }
        for bs in args.batches:
            batch = np.ascontiguousarray(x[:bs])
            t = time_per_image(runners, batch, args.repeats)
            rows.append((arch, bs, t["torch"], t["fp32"], t["int8"]))
            if "int8 bn-float" in t:
                extra.append((bs, t["fp32"], t["int8 bn-float"], t["int8"]))
            logger.info("%s batch %d done", arch, bs)

    print()
    print(
        f"ms/image on {args.threads} threads, {args.size}x{args.size}, median of "
        f"{ROUNDS} x {args.repeats} runs; onnxruntime {ort.__version__}, torch {torch.__version__}"
    )
    header = (
        f"{'arch':<12} {'batch':>5} {'torch':>8} {'ort fp32':>9} {'ort int8':>9} "
        f"{'fp32/torch':>11} {'int8/fp32':>10}"
    )
    print(header)
    print("-" * len(header))
    for arch, bs, tt, t32, t8 in rows:
        print(
            f"{arch:<12} {bs:>5} {tt:>8.1f} {t32:>9.1f} {t8:>9.1f} {tt / t32:>10.2f}x "
            f"{t32 / t8:>9.2f}x"
        )
    for bs, t32, t_plain, t8 in extra:
        print(
            f"densenet121 batch {bs}: int8 with BatchNorm left float {t_plain:.1f} ms "
            f"({t32 / t_plain:.2f}x fp32) -> BatchNorm as depthwise conv {t8:.1f} ms "
            f"({t32 / t8:.2f}x fp32)"
        )
    for variant, shares in profiles.items():
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:6])
        print(f"densenet121 int8 ({variant}), batch 1, ONNX Runtime profiler: {top}")
    print()
    print(
        f"int8 top-1 agreement with fp32 on the {len(x)} real images (calibrated on every "
        f"other one; 'decisive' = fp32 top-2 margin >= {DECISIVE_MARGIN})"
    )
    for arch, held, every, dec, n_dec, margin, acc, counts, trained in agreements:
        print(
            f"{arch:<12} held-out {held:.1%}, all {every:.1%}, decisive {dec:.1%} "
            f"({n_dec} images); median fp32 margin {margin:.2f}; fp32 accuracy {acc:.1%}; "
            f"fp32 predictions {counts}"
        )
        print(f"{'':<12} model: {trained}")
    print(f"models in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
