"""Scope guard rates and heatmap cost of an exported model (serving side only, no torch).

Given a model exported with the ``cam`` output and a guard (``xrwatch export`` of a run
folder that has its splits), it prints

1. the fraction of real chest X-rays flagged ``out_of_scope`` (``--real``, default
   ``../shared/data/xray/real``; target <= 3 %), and the DICOMs in ``--dicom`` one by one;
2. the fraction of non-chest images caught (target >= 95 %), on a set assembled here and
   written as PNG to a temporary folder: scikit-image's bundled sample images (photos,
   micrographs, text, a CT phantom ...; skipped when scikit-image is not installed),
   blank/constant, noise and gradient images, rendered text pages and a drawn
   "screenshot"; per kind and in total, with the images it missed;
3. the cost of the heatmap per image: ONNX inference alone (``probabilities``), inference
   with the ``cam`` output, and rendering + atomically writing the overlay PNG, median of
   ``--repeats`` rounds over ``--timing-images`` real images, batch 1, on the CPU named.

    .venv/bin/python benchmarks/explain.py --model model.onnx
"""

from __future__ import annotations

import argparse
import csv
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xrwatch.engine import InferenceEngine, expand_inputs  # noqa: E402
from xrwatch.heatmap import PNG_COMPRESS_LEVEL, render_overlay, write_heatmap  # noqa: E402
from xrwatch.preprocess import load_model_input  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "xray"
SKIMAGE_SAMPLES = (  # bundled with scikit-image (no download)
    "astronaut", "brick", "camera", "cat", "checkerboard", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
    "logo", "microaneurysms", "moon", "page", "retina", "rocket", "text",
    "shepp_logan_phantom", "cell", "binary_blobs",
)  # fmt: skip


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _save(folder: Path, kind: str, name: str, array: np.ndarray) -> None:
    (folder / kind).mkdir(parents=True, exist_ok=True)
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = np.clip(a * 255.0 if a.max() <= 1.0 else a, 0, 255).astype(np.uint8)
    Image.fromarray(a).save(folder / kind / f"{name}.png")


def assemble_non_chest(folder: Path, seed: int = 0) -> None:
    """Write the non-chest test images (see the module docstring) under ``folder/<kind>/``."""
    rng = np.random.default_rng(seed)
    try:
        from skimage import data as skdata
    except ImportError:
        print("scikit-image not installed: no sample photographs/micrographs", file=sys.stderr)
    else:
        for name in SKIMAGE_SAMPLES:
            try:
                img = getattr(skdata, name)()
            except Exception as exc:  # a sample that needs a download
                print(f"skipping skimage {name}: {exc}", file=sys.stderr)
                continue
            if img.dtype == bool:
                img = img.astype(np.uint8) * 255
            _save(folder, "skimage", name, img)
    size = 512
    for value in (0.0, 0.5, 1.0, 0.2):
        _save(folder, "blank", f"constant_{value:g}", np.full((size, size), value))
    _save(folder, "noise", "uniform", rng.random((size, size)))
    _save(folder, "noise", "gaussian", np.clip(rng.normal(0.5, 0.15, (size, size)), 0, 1))
    _save(folder, "noise", "salt_pepper", (rng.random((size, size)) > 0.5).astype(float))
    ramp = np.linspace(0, 1, size)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    _save(folder, "gradient", "horizontal", np.tile(ramp, (size, 1)))
    _save(folder, "gradient", "vertical", np.tile(ramp[:, None], (1, size)))
    _save(folder, "gradient", "radial", np.clip(1 - np.sqrt(xx**2 + yy**2), 0, 1))
    _save(folder, "gradient", "radial_inverse", np.clip(np.sqrt(xx**2 + yy**2) / 1.4, 0, 1))
    for i, (bg, fg) in enumerate(((255, 0), (0, 255), (235, 40))):
        page = Image.new("L", (size, size), bg)
        draw = ImageDraw.Draw(page)
        for line in range(28):
            words = " ".join(["lorem", "ipsum", "dolor", "sit", "amet"][: 2 + (line * 7 + i) % 4])
            draw.text((12, 8 + line * 18), f"{line:02d} {words} {rng.integers(1e6)}", fill=fg)
        _save(folder, "text", f"page_{i}", np.asarray(page))
    for i in range(3):
        shot = Image.new("RGB", (640, 400), (240, 240, 240))
        draw = ImageDraw.Draw(shot)
        draw.rectangle((0, 0, 640, 28), fill=(40, 60, 120))
        draw.text((8, 8), f"PACS viewer - window {i}", fill=(255, 255, 255))
        draw.rectangle((0, 28, 140, 400), fill=(225, 225, 230))
        for j in range(10):
            draw.text((8, 40 + j * 20), f"menu item {j}", fill=(20, 20, 20))
            draw.rectangle((160, 40 + j * 34, 620, 64 + j * 34), outline=(120, 120, 120))
        _save(folder, "screenshot", f"ui_{i}", np.asarray(shot))


SCORES: dict[str, list[float]] = {}  # ood_score per set, for the overlap line


def flagged(
    engine: InferenceEngine, files: list[Path], name: str = ""
) -> list[tuple[Path, bool, str]]:
    preds = [p for p in engine.predict_paths(files) if p.ok]
    SCORES[name] = [p.ood_score for p in preds if p.ood_score is not None]
    return [(Path(p.file), p.flag == "out_of_scope", p.flag_reason or "") for p in preds]


def time_heatmaps(engine: InferenceEngine, files: list[Path], repeats: int) -> None:
    """Median ms/image of inference with and without ``cam``, and of rendering + writing the
    overlay alone (timed on its own: under a noisy load, differences of whole runs drown)."""
    session = engine._session  # the engine's own session: same threads, same providers
    arrays = [load_model_input(f, engine.spec)[0][None, None] for f in files]
    outputs = [engine.predict_outputs(a) for a in arrays]
    with tempfile.TemporaryDirectory() as tmp:

        def infer(names: list[str]) -> None:
            for a in arrays:
                session.run(names, {"image": a})

        def render() -> None:
            for i, (a, out) in enumerate(zip(arrays, outputs, strict=True)):
                assert out.cam is not None
                best = int(out.probabilities[0].argmax())
                write_heatmap(Path(tmp), f"x{i}", a[0, 0], out.cam[0, best], "Normal", 0.5)

        def draw() -> list[Image.Image]:
            return [
                render_overlay(a[0, 0], out.cam[0, int(out.probabilities[0].argmax())], "x")
                for a, out in zip(arrays, outputs, strict=True)
                if out.cam is not None
            ]

        drawn = draw()

        def encode() -> None:
            for image in drawn:
                image.save(io.BytesIO(), format="PNG", compress_level=PNG_COMPRESS_LEVEL)

        infer(["probabilities"])  # warm-up
        render()
        times: dict[str, list[float]] = {
            "inference": [], "inference+cam": [], "overlay": [], "render": [], "encode": []
        }  # fmt: skip
        for _ in range(repeats):
            for key, fn in (
                ("inference", lambda: infer(["probabilities"])),
                ("inference+cam", lambda: infer(["probabilities", "cam"])),
                ("overlay", render),
                ("render", draw),
                ("encode", encode),
            ):
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) / len(arrays) * 1000)
    base = statistics.median(times["inference"])
    cam = statistics.median(times["inference+cam"])
    overlay = statistics.median(times["overlay"])
    total = max(cam - base, 0.0) + overlay
    print(f"\nheatmap cost ({engine.meta.arch} at {engine.spec.size} px, batch 1, "
          f"{len(arrays)} images x {repeats} rounds, {cpu_name()}):")  # fmt: skip
    print(f"  inference, probabilities only  : {base:8.2f} ms/image")
    print(f"  inference + cam output         : {cam:8.2f} ms/image ({(cam - base) / base:+.1%})")
    print(f"  overlay render + atomic PNG    : {overlay:8.2f} ms/image")
    drawn_ms, encode_ms = statistics.median(times["render"]), statistics.median(times["encode"])
    print(f"    of which: drawing {drawn_ms:.2f}, PNG encoding {encode_ms:.2f}, "
          f"file write + fsync + rename {max(overlay - drawn_ms - encode_ms, 0.0):.2f} "
          f"(image {drawn[0].width}x{drawn[0].height})" if drawn else "")  # fmt: skip
    print(f"  heatmap total (cam extra, if > 0, + overlay): {total / base:.1%} of inference")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--real", type=Path, default=SHARED / "real")
    ap.add_argument("--dicom", type=Path, default=SHARED / "dicom")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timing-images", type=int, default=16)
    ap.add_argument("--no-timing", action="store_true", help="skip the heatmap timing")
    ap.add_argument("--no-rates", action="store_true", help="skip the guard rates")
    ap.add_argument(
        "--splits",
        type=Path,
        help="a run's splits/ folder: also print this file's guard pass rate on its val/test",
    )
    args = ap.parse_args()

    engine = InferenceEngine(args.model, use_gpu=False, intra_op_threads=args.threads)
    if not engine.has_guard or args.no_rates:
        if not engine.has_guard:
            print(f"{args.model} has no scope guard (export it from a run folder with splits)")
        if engine.has_cam and not args.no_timing:
            time_heatmaps(engine, expand_inputs([args.real])[: args.timing_images], args.repeats)
            return 0
        return 2
    guard = engine.meta.guard or {}
    print(f"model {args.model.name}: {engine.meta.arch}, {engine.spec.size} px, guard {guard}")

    if args.splits is not None:
        for split in ("val", "test"):
            with (args.splits / f"{split}.csv").open(newline="", encoding="utf-8") as fh:
                files = [Path(row["path"]) for row in csv.DictReader(fh)]
            hits = flagged(engine, files)
            passed = sum(not hit for _, hit, _ in hits)
            target = guard.get("target_pass_rate")
            print(f"{split} split passing the guard on this file: {passed}/{len(hits)} = "
                  f"{passed / max(len(hits), 1):.1%} (target {target})")  # fmt: skip

    real = expand_inputs([args.real])
    rows = flagged(engine, real, "real")
    n_flag = sum(f for _, f, _ in rows)
    print(f"\nreal chest X-rays flagged out_of_scope: {n_flag}/{len(rows)} = "
          f"{n_flag / max(len(rows), 1):.1%} (target <= 3%)")  # fmt: skip
    by_folder: dict[str, list[bool]] = {}
    for path, f, _ in rows:
        by_folder.setdefault(path.relative_to(args.real).parts[0], []).append(f)
    for folder, values in sorted(by_folder.items()):
        print(f"  {folder:12s} {sum(values)}/{len(values)} flagged")
    for path, f, why in rows:
        if f:
            print(f"  flagged: {path.relative_to(args.real)}: {why}")
    if args.dicom.is_dir():
        print("DICOM files (for information):")
        for path, f, why in flagged(engine, expand_inputs([args.dicom])):
            print(f"  {path.name[:48]}: {'out_of_scope: ' + why if f else 'passes'}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        assemble_non_chest(folder)
        rows = flagged(engine, expand_inputs([folder]), "non-chest")
        kinds: dict[str, list[bool]] = {}
        for path, f, _ in rows:
            kinds.setdefault(path.relative_to(folder).parts[0], []).append(f)
        caught = sum(f for _, f, _ in rows)
        print(f"\nnon-chest images caught (out_of_scope): {caught}/{len(rows)} = "
              f"{caught / max(len(rows), 1):.1%} (target >= 95%)")  # fmt: skip
        for kind, values in sorted(kinds.items()):
            print(f"  {kind:12s} {sum(values)}/{len(values)}")
        for path, f, _ in rows:
            if not f:
                print(f"  missed: {path.relative_to(folder)}")
    if SCORES.get("real") and SCORES.get("non-chest"):
        print(
            f"overlap of the scores: real chest X-rays' 97th percentile of ood_score "
            f"{np.quantile(SCORES['real'], 0.97):.2f}, lowest non-chest "
            f"{min(SCORES['non-chest']):.2f} (no overlap when the first is the smaller)"
        )

    if not args.no_timing:
        time_heatmaps(engine, real[: args.timing_images], args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
