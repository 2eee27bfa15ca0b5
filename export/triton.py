"""A Triton Inference Server model repository for the exported model.

Layout (Triton's convention)::

    DIR/<name>/config.pbtxt        onnxruntime backend, max batch size, dynamic batching
    DIR/<name>/labels.txt          class names, one a line (Triton's classification extension)
    DIR/<name>/<version>/model.onnx

The same self-describing ONNX file is served, so a Triton cluster computes exactly what
``xrwatch classify`` computes. The config (:func:`xrwatch.remote.repository.render_config`)
names every output of the file, carries its xrwatch metadata as parameters and pins the
version just written: ``xrwatch serve/classify --triton`` read the metadata from the server,
apply ``xrwatch.preprocess`` locally and send float32 N x 1 x H x W (docs/triton.md).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from xrwatch.errors import ConfigError
from xrwatch.modelmeta import ModelMeta
from xrwatch.remote.repository import DEFAULT_MAX_BATCH, read_served_model, render_config

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_repository(
    root: Path,
    model_path: Path,
    meta: ModelMeta,
    *,
    name: str = "xrwatch",
    max_batch_size: int = DEFAULT_MAX_BATCH,
) -> Path:
    """Add ``model_path`` to the Triton repository ``root`` as a new version of ``name``.

    The first export of a name is version 1; later ones take the next free version number
    (Triton serves the highest by default), and config.pbtxt/labels.txt are rewritten.
    Returns the model's folder ``root/name``.
    """
    if not _NAME.match(name):
        raise ConfigError(f"invalid Triton model name {name!r} (letters, digits, _ . -)")
    if not 1 <= max_batch_size <= 4096:
        raise ConfigError(f"Triton max batch size must be in 1..4096, got {max_batch_size}")
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    version = max(versions, default=0) + 1
    (model_dir / str(version)).mkdir()
    shutil.copyfile(model_path, model_dir / str(version) / "model.onnx")
    (model_dir / "labels.txt").write_text("\n".join(meta.classes) + "\n", encoding="utf-8")
    config = render_config(  # every output, the metadata as parameters, this version pinned
        name,
        read_served_model(model_path),
        version=version,
        backend="onnxruntime",
        max_batch_size=max_batch_size,
        labels_file="labels.txt",
    )
    (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
    logger.info("Triton repository %s: model %s version %d", root, name, version)
    return model_dir
