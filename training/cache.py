"""Decode and preprocess every image of a dataset once; later epochs read a memory map.

Each image goes through :func:`xrwatch.preprocess.load_model_input` (the one path from a
file to a model input) exactly once, in parallel worker processes. The (size x size)
results are stored as float16 in ``CACHE/<key>.f16`` (a raw N x size x size array, ~100 kB
per image at 224 px) with ``CACHE/<key>.json`` beside it. The key hashes the preprocessing
spec and every file's path, size and modification time, so a changed image or spec makes a
new cache. Decoding doubles as the dataset check: a missing or unreadable file is recorded
with its reason instead of stopping the run (unless the caller is strict).

Torch-free: the workers use only numpy, Pillow and pydicom.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xrwatch.errors import XRWatchError
from xrwatch.preprocess import PreprocessSpec, load_model_input

logger = logging.getLogger(__name__)

# Bumped when decoding changes what an input becomes (2: native DICOM read at reduced
# resolution by block averages), so that no cache made by older code is reused.
CACHE_VERSION = 2


@dataclass
class ImageCache:
    """``images[i]`` is the model input of ``paths[i]``, or zeros where ``ok[i]`` is False."""

    paths: list[str]
    images: np.ndarray  # float16 memmap, N x size x size, values in [0, 1]
    ok: np.ndarray  # bool, N
    failures: dict[str, str]  # path -> reason (missing, unreadable ...)


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}|missing"
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def cache_key(paths: Sequence[str], spec: PreprocessSpec) -> str:
    h = hashlib.sha256(f"xrwatch-cache-{CACHE_VERSION}|{spec.to_json()}".encode())
    for p in paths:
        h.update(_stat_key(p).encode())
        h.update(b"\n")
    return h.hexdigest()[:24]


def _decode(job: tuple[str, str]) -> tuple[np.ndarray | None, str | None]:
    path, spec_json = job
    spec = PreprocessSpec.from_json(spec_json)
    if not os.path.isfile(path):
        return None, "missing"
    try:
        pixels, _meta = load_model_input(path, spec)
    except XRWatchError as exc:
        return None, f"unreadable: {getattr(exc, 'reason', exc)}"
    except Exception as exc:  # a decoder bug must not kill a 6-experiment run
        return None, f"unreadable: {type(exc).__name__}: {exc}"
    return pixels.astype(np.float16), None


def build_cache(
    paths: Sequence[str | Path],
    spec: PreprocessSpec,
    cache_dir: str | Path,
    *,
    workers: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> ImageCache:
    """Decode ``paths`` once (or reuse an existing cache) and return the memory-mapped result."""
    names = [str(Path(p).resolve()) for p in paths]
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    key = cache_key(names, spec)
    data_file, index_file = directory / f"{key}.f16", directory / f"{key}.json"
    shape = (len(names), spec.size, spec.size)
    if data_file.is_file() and index_file.is_file():
        meta = json.loads(index_file.read_text(encoding="utf-8"))
        logger.info("image cache hit: %s (%d images)", data_file, len(names))
        images = np.memmap(data_file, dtype=np.float16, mode="r", shape=shape)
        return ImageCache(names, images, np.array(meta["ok"], bool), meta["failures"])

    n_workers = workers or min(8, os.cpu_count() or 1)
    logger.info("decoding %d images at %d px into %s (%d workers)", len(names), spec.size,
                directory, n_workers)  # fmt: skip
    tmp = data_file.with_name(data_file.name + f".{os.getpid()}.tmp")
    out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=shape) if names else None
    ok = np.zeros(len(names), dtype=bool)
    failures: dict[str, str] = {}
    jobs = [(p, spec.to_json()) for p in names]
    if n_workers > 1 and len(names) > 16:
        # fork, as torch's DataLoader does on Linux (the workers touch neither torch nor
        # CUDA); spawn elsewhere, which needs the caller's script to be import-safe.
        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
            results = pool.map(_decode, jobs, chunksize=16)
            _collect(results, out, ok, failures, names, on_progress)
    else:
        _collect(map(_decode, jobs), out, ok, failures, names, on_progress)
    if out is not None:
        out.flush()
        del out
    else:
        tmp.write_bytes(b"")
    os.replace(tmp, data_file)
    index_tmp = index_file.with_name(index_file.name + f".{os.getpid()}.tmp")
    meta = {"paths": names, "ok": ok.tolist(), "failures": failures, "spec": spec.to_dict()}
    index_tmp.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(index_tmp, index_file)  # written last, atomically: its presence means complete
    mapped = (
        np.memmap(data_file, dtype=np.float16, mode="r", shape=shape)
        if names
        else np.zeros(shape, np.float16)
    )
    return ImageCache(names, mapped, ok, failures)


def _collect(
    results: Iterable[tuple[np.ndarray | None, str | None]],
    out: np.ndarray | None,
    ok: np.ndarray,
    failures: dict[str, str],
    names: list[str],
    on_progress: Callable[[int, int], None] | None,
) -> None:
    for i, (pixels, error) in enumerate(results):
        if pixels is not None and out is not None:
            out[i] = pixels
            ok[i] = True
        else:
            failures[names[i]] = error or "unreadable"
        if on_progress is not None:
            on_progress(i + 1, len(names))
