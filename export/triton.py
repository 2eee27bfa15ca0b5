"""A Triton Inference Server model repository for the exported model.

Layout (Triton's convention)::

    DIR/<name>/config.pbtxt        onnxruntime backend, max batch size, dynamic batching
    DIR/<name>/labels.txt          class names, one a line (Triton's classification extension)
    DIR/<name>/<version>/model.onnx

The same self-describing ONNX file is served, so a Triton cluster computes exactly what
``xrwatch classify`` computes; clients still apply ``xrwatch.preprocess`` (the spec is in
the model's metadata) and send float32 N x 1 x H x W.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from xrwatch.errors import ConfigError
from xrwatch.modelmeta import ModelMeta

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def render_config(name: str, meta: ModelMeta, *, max_batch_size: int = DEFAULT_MAX_BATCH) -> str:
    """config.pbtxt text. Dims exclude the batch axis (Triton adds it: max_batch_size > 0)."""
    size, n = meta.spec.size, len(meta.classes)
    preferred = sorted({b for b in (4, 8, 16, max_batch_size) if b <= max_batch_size})
    header = f"# xrwatch {meta.arch} ({meta.experiment}, {meta.precision})"
    return f"""{header}; model sha256 {meta.model_sha256}
# Research use only - not a medical device.
name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
  {{
    name: "image"
    data_type: TYPE_FP32
    dims: [ 1, {size}, {size} ]
  }}
]
output [
  {{
    name: "logits"
    data_type: TYPE_FP32
    dims: [ {n} ]
  }},
  {{
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ {n} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(b) for b in preferred)} ]
  max_queue_delay_microseconds: 2000
}}
instance_group [
  {{
    count: 1
    kind: KIND_AUTO
  }}
]
"""


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
    (model_dir / "config.pbtxt").write_text(
        render_config(name, meta, max_batch_size=max_batch_size), encoding="utf-8"
    )
    logger.info("Triton repository %s: model %s version %d", root, name, version)
    return model_dir
