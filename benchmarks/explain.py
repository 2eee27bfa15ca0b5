"""Scope guard rates and heatmap cost of an exported model (serving side only, no torch).

Given a model exported with the ``cam`` output and a guard (``xrwatch export`` of a run
folder that has its splits), it prints

1. the fraction of real chest X-rays flagged ``out_of_scope`` (``--real``, default
   ``../shared/data/xray/real``; target <= 3 %), and the DICOMs in ``--dicom`` one by one;
2. the fraction of non-chest images caught (target >= 95 %), on the two sets
   ``benchmarks/nonchest.py`` writes as PNG to a temporary folder (the set the issue
   describes - scikit-image's samples, blank, noise, gradients, text pages, screenshots,
   CT/MR/NM/US slices - and a confirmation set assembled after the guard was chosen); per
   set and kind, with the images it missed;
3. the cost of the heatmap per image: ONNX inference alone (``probabilities``), inference
   with the ``cam`` output, and rendering + atomically writing the overlay PNG, median of
   ``--repeats`` rounds over ``--timing-images`` real images, on the CPU named: at batch 1
   (overlays one after another), and as the daemon pays it, at its default batch size with
   each batch's overlays written by the same ``HeatmapWriter`` (a few threads).

    .venv/bin/python benchmarks/explain.py --model model.onnx
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import itertools
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nonchest import assemble_confirmation, assemble_non_chest  # noqa: E402

from xrwatch import atomic, pngwrite  # noqa: E402
from xrwatch.engine import InferenceEngine, expand_inputs  # noqa: E402
from xrwatch.flags import SCOPE_GUARDS  # noqa: E402
from xrwatch.heatmap import (  # noqa: E402
    PNG_COMPRESS_LEVEL,
    PNG_TMP_SUFFIX,
    HeatmapJob,
    HeatmapWriter,
    caption_of,
    encode_overlay,
    heatmap_path,
    overlay_pixels,
)
from xrwatch.pngwrite import DEFLATE, encode_rgb  # noqa: E402
from xrwatch.preprocess import load_model_input  # noqa: E402
from xrwatch.serve.config import ServeConfig  # noqa: E402
from xrwatch.sysinfo import describe as describe_machine  # noqa: E402

BATCH_SIZE = ServeConfig.batch_size  # the daemon's default

PIPELINE_ROUNDS = 4  # the pipelined timing goes through the timing images this many times
SHARED = ROOT.parent / "shared" / "data" / "xray"
SCORES: dict[str, list[float]] = {}  # ood_score per set, for the overlap line


def flagged(
    engine: InferenceEngine, files: list[Path], name: str = ""
) -> list[tuple[Path, bool, str]]:
    preds = [p for p in engine.predict_paths(files) if p.ok]
    SCORES.setdefault(name, []).extend(p.ood_score for p in preds if p.ood_score is not None)
    return [(Path(p.file), p.flag == "out_of_scope", p.flag_reason or "") for p in preds]


NON_CHEST_SETS = (  # (title, writer): benchmarks/nonchest.py
    ("non-chest images caught (out_of_scope)", assemble_non_chest),
    ("confirmation set caught (assembled after the guard was chosen)", assemble_confirmation),
)


def by_first_folder(rows: list[tuple[Path, bool, str]], root: Path) -> dict[str, list[bool]]:
    """Flags of ``rows`` grouped by the first folder under ``root`` (class or kind)."""
    groups: dict[str, list[bool]] = {}
    for path, hit, _ in rows:
        groups.setdefault(path.relative_to(root).parts[0], []).append(hit)
    return dict(sorted(groups.items()))


def non_chest_sets(
    engine: InferenceEngine, tmp: Path
) -> list[tuple[str, Path, list[tuple[Path, bool, str]]]]:
    """``(title, folder, flagged rows)`` of each non-chest set, written under ``tmp``."""
    out = []
    for title, assemble in NON_CHEST_SETS:
        folder = tmp / assemble.__name__
        assemble(folder)
        out.append((title, folder, flagged(engine, expand_inputs([folder]), "non-chest")))
    return out


def time_heatmaps(
    engine: InferenceEngine, files: list[Path], repeats: int, threads: int | None = None
) -> None:
    """Median ms/image of inference with and without ``cam``, and of rendering + writing the
    overlays alone (timed on their own: under a noisy load, differences of whole runs drown);
    at batch 1, one overlay after another, and at the daemon's default batch size, a batch's
    overlays written through the :class:`HeatmapWriter` the daemon uses. Every timed call
    writes new files (a new folder per call), as the daemon does for new inputs."""
    session = engine._session  # the engine's own session: same threads, same providers
    arrays = [load_model_input(f, engine.spec)[0][None, None] for f in files]
    n = len(arrays)
    batch_size = BATCH_SIZE
    batches = [np.concatenate(arrays[i : i + batch_size]) for i in range(0, n, batch_size)]
    outputs = [engine.predict_outputs(b) for b in batches]
    jobs: list[HeatmapJob] = []  # one per image, labelled with its own prediction
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        writer = stack.enter_context(HeatmapWriter(threads))
        for b, (batch, out) in enumerate(zip(batches, outputs, strict=True)):
            assert out.cam is not None
            for i, probs in enumerate(out.probabilities):
                best = int(probs.argmax())
                jobs.append(HeatmapJob(Path(tmp), f"x{b}-{i}", batch[i, 0], out.cam[i, best],
                                       engine.classes[best], float(probs[best])))  # fmt: skip
        batch_jobs = [jobs[i : i + batch_size] for i in range(0, n, batch_size)]
        single = stack.enter_context(HeatmapWriter(threads=1))  # one image per batch: no hand-off
        others = {
            k: stack.enter_context(HeatmapWriter(threads=k))
            for k in (1, 2, 4)
            if k != writer.threads
        }
        calls = itertools.count()

        def fresh(some: list[HeatmapJob]) -> list[HeatmapJob]:
            """``some`` writing to new names: the daemon writes new files, not over old ones."""
            folder = f"call{next(calls)}/"
            return [dataclasses.replace(j, rel=folder + j.rel) for j in some]

        def infer(names: list[str], inputs: list[np.ndarray]) -> None:
            for a in inputs:
                session.run(names, {"image": a})

        def draw() -> list[np.ndarray]:
            return [
                overlay_pixels(j.pixels, j.cam, caption_of(j.label, j.confidence)) for j in jobs
            ]

        cycle = list(zip(batches, batch_jobs, strict=True)) * PIPELINE_ROUNDS

        def pipelined(with_heatmaps: bool) -> None:
            """The daemon's loop: infer a batch, hand its overlays to the writer's background
            thread, then wait for the batch before it (``Daemon._finish_begun(keep=1)``)."""
            names = ["probabilities", "cam"] if with_heatmaps else ["probabilities"]
            waiting = None
            for batch, bj in cycle:
                session.run(names, {"image": batch})
                if with_heatmaps:
                    if waiting is not None:
                        waiting.result()
                    waiting = writer.submit_many(fresh(bj))
            if waiting is not None:
                waiting.result()

        encoded = [[(j, encode_overlay(j)) for j in bj] for bj in batch_jobs]

        def files_alone(hint: bool) -> None:
            """The batches' PNG files, already encoded, written as ``write_many`` writes them
            (a new folder, ``replace_all``); with ``hint`` False, without starting every
            file's writeback before the fsyncs (each fsync then waits for its own file)."""
            unhinted = mock.patch.object(atomic, "_start_writeback", lambda fd: None)
            with contextlib.nullcontext() if hint else unhinted:
                for batch in encoded:
                    renamed = fresh([job for job, _ in batch])
                    named = [
                        (heatmap_path(job.root, job.rel), data)
                        for job, (_, data) in zip(renamed, batch, strict=True)
                    ]
                    atomic.make_dirs(named[0][0].parent)
                    atomic.replace_all(named, suffix=PNG_TMP_SUFFIX)

        def with_zlib(fn: Callable[[], object]) -> object:
            """``fn`` with the PNG encoder deflating by the standard ``zlib`` (its fallback)."""
            with mock.patch.object(pngwrite, "_deflate", zlib):
                return fn()

        drawn = draw()
        png_kb = statistics.mean(len(d) for bj in encoded for _, d in bj) / 1000
        measured: dict[str, Callable[[], object]] = {
            "inference": lambda: infer(["probabilities"], arrays),
            "inference+cam": lambda: infer(["probabilities", "cam"], arrays),
            "overlay": lambda: [single.write_many([j]) for j in fresh(jobs)],
            "render": draw,
            "encode": lambda: [encode_rgb(d, level=PNG_COMPRESS_LEVEL) for d in drawn],
            "encode, zlib": lambda: with_zlib(
                lambda: [encode_rgb(d, level=PNG_COMPRESS_LEVEL) for d in drawn]
            ),
            "batch inference": lambda: infer(["probabilities"], batches),
            "batch inference+cam": lambda: infer(["probabilities", "cam"], batches),
            "batch overlay": lambda: [writer.write_many(fresh(bj)) for bj in batch_jobs],
            **{  # the same batches with other thread counts, for HeatmapWriter's default
                f"batch overlay, {k} thread(s)": (
                    lambda w=w: [w.write_many(fresh(bj)) for bj in batch_jobs]  # type: ignore[misc]
                )
                for k, w in others.items()
            },
            "files": lambda: files_alone(True),
            "files, no hint": lambda: files_alone(False),
            "pipeline": lambda: pipelined(False),
            "pipeline+heatmaps": lambda: pipelined(True),
        }
        for fn in measured.values():  # warm-up: sessions, thread pool, legend strips
            fn()
        times: dict[str, list[float]] = {key: [] for key in measured}
        for _ in range(repeats):  # each round times everything: slow phases hit all alike
            for key, fn in measured.items():
                t0 = time.perf_counter()
                fn()
                per = n * PIPELINE_ROUNDS if key.startswith("pipeline") else n
                times[key].append((time.perf_counter() - t0) / per * 1000)
        ms = {key: statistics.median(values) for key, values in times.items()}
        threads = writer.threads
    print(f"\nheatmap cost ({engine.meta.arch} at {engine.spec.size} px, {n} images x {repeats} "
          f"rounds, medians; PNG deflate: {DEFLATE}; {describe_machine()}):")  # fmt: skip
    for title, prefix in (
        ("batch 1, overlays written one after another", ""),
        (f"batch {batch_size} (the daemon's default), each batch's overlays written by "
         f"HeatmapWriter in {threads} thread(s)", "batch "),
    ):  # fmt: skip
        base, cam = ms[prefix + "inference"], ms[prefix + "inference+cam"]
        overlay = ms[prefix + "overlay"]
        total = max(cam - base, 0.0) + overlay
        print(f" {title}:")
        print(f"  inference, probabilities only  : {base:8.2f} ms/image")
        print(
            f"  inference + cam output         : {cam:8.2f} ms/image ({(cam - base) / base:+.1%})"
        )
        print(f"  overlay render + atomic PNG    : {overlay:8.2f} ms/image")
        if not prefix and drawn:
            drawn_ms, encode_ms = ms["render"], ms["encode"]
            print(f"    of which: drawing {drawn_ms:.2f}, PNG encoding {encode_ms:.2f}, "
                  f"file write + fsync + rename {max(overlay - drawn_ms - encode_ms, 0.0):.2f} "
                  f"(image {drawn[0].shape[1]}x{drawn[0].shape[0]}, PNG {png_kb:.1f} kB "
                  f"on average)")  # fmt: skip
            if DEFLATE != "zlib":
                print(f"    PNG encoding with zlib (the fallback) instead of {DEFLATE}: "
                      f"{ms['encode, zlib']:.2f} ms/image")  # fmt: skip
        if prefix:
            files_ms, plain = ms["files"], ms["files, no hint"]
            print(f"    of which the files alone (create, write, fsync, rename; PNGs encoded "
                  f"before): {files_ms:.2f} ({files_ms / base:.1%} of inference; "
                  f"{plain:.2f} without starting every file's writeback first)")  # fmt: skip
            for key in (k for k in ms if k.startswith("batch overlay, ")):
                print(f"    with HeatmapWriter in {key.split(', ')[1]} instead: "
                      f"{ms[key]:.2f} ms/image")  # fmt: skip
        print(f"  heatmap total (cam extra, if > 0, + overlay): {total / base:.1%} of inference")
    base, with_maps = ms["pipeline"], ms["pipeline+heatmaps"]
    print(
        f" batch {batch_size}, pipelined as the daemon runs it (a batch's overlays written in "
        f"the background while the next batch is inferred; {n * PIPELINE_ROUNDS} images):"
    )
    print(f"  inference alone                : {base:8.2f} ms/image")
    print(f"  inference + cam + overlays     : {with_maps:8.2f} ms/image")
    print(f"  heatmap cost as the daemon pays it: {(with_maps - base) / base:.1%} of inference")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--real", type=Path, default=SHARED / "real")
    ap.add_argument("--dicom", type=Path, default=SHARED / "dicom")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--scope-guard",
        default="combined",
        choices=SCOPE_GUARDS,
        help="which guard score flags out_of_scope (as serve's scope_guard)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timing-images", type=int, default=16)
    ap.add_argument(
        "--heatmap-threads",
        type=int,
        help="HeatmapWriter threads for the batch timing (default: the daemon's)",
    )
    ap.add_argument("--no-timing", action="store_true", help="skip the heatmap timing")
    ap.add_argument("--no-rates", action="store_true", help="skip the guard rates")
    ap.add_argument(
        "--splits",
        type=Path,
        help="a run's splits/ folder: also print this file's guard pass rate on its val/test",
    )
    args = ap.parse_args()

    engine = InferenceEngine(
        args.model, use_gpu=False, intra_op_threads=args.threads, scope_guard=args.scope_guard
    )
    if not engine.has_guard or args.no_rates:
        if not engine.has_guard:
            print(f"{args.model} has no scope guard (export it from a run folder with splits)")
        if engine.has_cam and not args.no_timing:
            time_heatmaps(
                engine,
                expand_inputs([args.real])[: args.timing_images],
                args.repeats,
                args.heatmap_threads,
            )
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
    for folder, values in by_first_folder(rows, args.real).items():
        print(f"  {folder:12s} {sum(values)}/{len(values)} flagged")
    for path, f, why in rows:
        if f:
            print(f"  flagged: {path.relative_to(args.real)}: {why}")
    if args.dicom.is_dir():
        print("DICOM files (for information):")
        for path, f, why in flagged(engine, expand_inputs([args.dicom])):
            print(f"  {path.name[:48]}: {'out_of_scope: ' + why if f else 'passes'}")

    with tempfile.TemporaryDirectory() as tmp:
        for title, folder, rows in non_chest_sets(engine, Path(tmp)):
            caught = sum(f for _, f, _ in rows)
            print(f"\n{title}: {caught}/{len(rows)} = "
                  f"{caught / max(len(rows), 1):.1%} (target >= 95%)")  # fmt: skip
            for kind, values in by_first_folder(rows, folder).items():
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
        time_heatmaps(engine, real[: args.timing_images], args.repeats, args.heatmap_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
