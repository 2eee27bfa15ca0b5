"""Files in, predictions out: the work of :meth:`xrwatch.engine.InferenceEngine.predict_paths`.

Owns the path from files to results: each file read once (hashed, then decoded from those
bytes by :func:`xrwatch.preprocess.load_model_input` with the model's own spec), the
readable ones run ``batch_size`` at a time, a file that cannot be read turned into a
``status="error"`` prediction that never stops the batch, and, given a heatmap folder,
each ok file's overlay written (the batch's in parallel) with its result's flag.

Never imports torch, ``onnx``, ``training`` or ``export``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xrwatch.errors import ImageError
from xrwatch.filehash import read_and_hash
from xrwatch.preprocess import load_model_input

if TYPE_CHECKING:
    from xrwatch.engine import InferenceEngine, Prediction
    from xrwatch.heatmap import HeatmapJob

logger = logging.getLogger(__name__)


def _load(engine: InferenceEngine, path: Path) -> tuple[np.ndarray, Any, str] | Prediction:
    """``(input, image meta, sha256)`` for one file, or its error :class:`Prediction`."""
    sha: str | None = None
    try:
        sha, data = read_and_hash(path)  # read once: hashed, then decoded from memory
        pixels, meta = load_model_input(path, engine.spec, data=data)
    except ImageError as exc:
        return engine.failure(path, exc.reason, sha256=sha)
    except OSError as exc:
        return engine.failure(path, f"cannot read file: {exc.strerror or exc}", sha256=sha)
    except Exception as exc:  # a reader bug must not stop the batch
        logger.exception("unexpected error reading %s", path)
        return engine.failure(path, f"unexpected error: {type(exc).__name__}: {exc}", sha256=sha)
    return pixels, meta, sha


def predict_paths(
    engine: InferenceEngine,
    paths: Iterable[str | Path],
    batch_size: int = 8,
    *,
    heatmaps: Path | None = None,
    root: Path | None = None,
) -> list[Prediction]:
    """One :class:`Prediction` per path, in order (see ``InferenceEngine.predict_paths``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[Prediction | None] = []
    pending: list[tuple[int, Path, np.ndarray, Any, str]] = []
    writer = None
    if heatmaps is not None and engine.has_cam:
        from xrwatch.heatmap import HeatmapWriter

        writer = HeatmapWriter()  # the batch's overlays in parallel

    def flush() -> None:
        if not pending:
            return
        out = engine.predict_outputs(np.stack([item[2] for item in pending]))
        done = [
            engine.prediction(
                path,
                out.probabilities[i],
                sha256=sha,
                meta=meta,
                ood_score=_item(out.ood_score, i),
                contrast=_item(out.contrast, i),
                population=_item(out.population, i),
            )
            for i, (_, path, _, meta, sha) in enumerate(pending)
        ]
        written: list[Path | None] = [None] * len(pending)
        if writer is not None and heatmaps is not None and out.cam is not None:
            jobs = [  # each with its result's flag, which the overlay shows
                _heatmap_job(
                    engine, heatmaps, path, root, pixels, out.probabilities[i], out.cam[i], p.flag
                )
                for i, ((_, path, pixels, _, _), p) in enumerate(zip(pending, done, strict=True))
            ]
            written = writer.write_many(jobs)  # in parallel; each None where it failed
        for (index, *_), p, png in zip(pending, done, written, strict=True):
            results[index] = p if png is None else replace(p, heatmap=str(png))
        pending.clear()

    try:
        for raw in paths:
            path = Path(raw)
            loaded = _load(engine, path)
            if not isinstance(loaded, tuple):  # the file's error Prediction
                logger.warning("cannot classify %s: %s", path, loaded.error)
                results.append(loaded)
                continue
            results.append(None)  # filled in by flush()
            pending.append((len(results) - 1, path, *loaded))
            if len(pending) >= batch_size:
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
    return [r for r in results if r is not None]


def _heatmap_job(
    engine: InferenceEngine,
    folder: Path,
    path: Path,
    root: Path | None,
    pixels: np.ndarray,
    row: np.ndarray,
    cam: np.ndarray,
    flag: str = "",
) -> HeatmapJob:
    """The overlay of one ok file, to ``folder/<path relative to root>.png``."""
    from xrwatch.heatmap import HeatmapJob

    rel = path.name
    if root is not None:
        try:
            rel = path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    best = int(np.argmax(row))
    return HeatmapJob(
        root=folder,
        rel=rel,
        pixels=pixels,
        cam=cam[best],
        label=engine.classes[best],
        confidence=float(row[best]),
        source=str(path),
        flag=flag,
    )


def _item(values: np.ndarray | None, index: int) -> float | None:
    return None if values is None else float(values[index])
