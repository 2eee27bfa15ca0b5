"""Triton model repositories whose ``config.pbtxt`` carries the model's xrwatch metadata.

A Triton server does not hand out an ONNX file's ``metadata_props``, so the metadata goes
into the model config as ``parameters`` (string values, the keys exactly as in the ONNX
file, see DEVELOPERS.md), plus:

* ``xrwatch.model_sha256`` - sha256 of the served ONNX file (the weights hash clients check);
* ``xrwatch.model_version`` - the repository version those parameters describe. The config
  pins the server to that version (``version_policy``), so a server never serves weights
  its parameters do not describe.

:func:`write_python_repository` writes a repository for Triton's Python backend, which runs
the file with ONNX Runtime (:mod:`xrwatch.remote.triton_model`); that is what a server
without the onnxruntime backend (the ``tritonserver`` in the ``nvidia-pytriton`` wheel) can
serve. GPU fleets use ``xrwatch export --triton`` (the onnxruntime backend).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from xrwatch.errors import ConfigError, ModelError
from xrwatch.filehash import file_sha256
from xrwatch.logs import native_stderr_to_log
from xrwatch.modelmeta import ModelMeta, parse_metadata

logger = logging.getLogger(__name__)

KEY_MODEL_SHA256 = "xrwatch.model_sha256"
KEY_MODEL_VERSION = "xrwatch.model_version"
INPUT_NAME = "image"
DEFAULT_MAX_BATCH = 32
MODEL_FILE = "model.onnx"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ServedModel:
    """What a repository needs to know about one ONNX file."""

    path: Path
    props: dict[str, str]  # the file's xrwatch.* metadata strings
    meta: ModelMeta
    outputs: tuple[tuple[str, tuple[int, ...]], ...]  # name, dims without the batch axis

    @property
    def sha256(self) -> str:
        return self.meta.model_sha256


def read_served_model(path: Path) -> ServedModel:
    """The metadata and output signature of the exported model at ``path``.

    Raises :class:`ModelError` (or ``ModelMetadataError``) naming the file.
    """
    import onnxruntime as ort

    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        with native_stderr_to_log():
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors are untyped
        raise ModelError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
    raw = session.get_modelmeta().custom_metadata_map
    props = {k: str(v) for k, v in raw.items() if k.startswith("xrwatch.")}
    meta = parse_metadata(props, path=path, model_sha256=file_sha256(path))
    outputs = []
    for out in session.get_outputs():
        dims = tuple(d if isinstance(d, int) else -1 for d in out.shape[1:])
        outputs.append((out.name, dims))
    return ServedModel(path=path, props=props, meta=meta, outputs=tuple(outputs))


def pbtxt_string(text: str) -> str:
    """``text`` as a protobuf text-format string literal (quoted, escaped, ASCII only)."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in "\\\"'":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def metadata_parameters(model: ServedModel, version: int) -> dict[str, str]:
    """The config parameters that describe ``model`` served as ``version``."""
    return {
        **model.props,
        KEY_MODEL_SHA256: model.sha256,
        KEY_MODEL_VERSION: str(version),
    }


# the onnxruntime backend's optimization { graph { level } } for each xrwatch.graph_optimization
# (its README: -1 basic, 1 extended, 2 none; absent = all)
ORT_BACKEND_LEVELS = {"disable": 2, "basic": -1, "extended": 1}


def _output_block(name: str, dims: tuple[int, ...], label_file: str | None) -> str:
    label = f' label_filename: "{label_file}"' if label_file else ""
    if dims:  # rank >= 2 in the file: the batch axis plus these
        shape = ", ".join(map(str, dims))
        return f'  {{ name: "{name}" data_type: TYPE_FP32 dims: [ {shape} ]{label} }}'
    # one value per image: Triton needs a non-empty shape, so [1] reshaped to none
    return f'  {{ name: "{name}" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }}'


def render_config(
    name: str,
    model: ServedModel,
    *,
    version: int,
    backend: str,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    instances: int = 1,
    kind: str = "KIND_AUTO",
    labels_file: str | None = None,
) -> str:
    """config.pbtxt for ``model`` served as ``name`` version ``version`` by ``backend``
    (``python`` or ``onnxruntime``); ``labels_file`` names the probabilities' labels."""
    size = model.meta.spec.size
    preferred = sorted({b for b in (4, 8, 16, max_batch_size) if b <= max_batch_size})
    outputs = ",\n".join(
        _output_block(n, d, labels_file if n == "probabilities" else None) for n, d in model.outputs
    )
    level = ORT_BACKEND_LEVELS.get(model.meta.graph_optimization)
    optimization = (  # the level export verified the file at, as the local engine uses
        f"optimization {{ graph {{ level: {level} }} }}\n"
        if backend == "onnxruntime" and level is not None
        else ""
    )
    params = "\n".join(
        f"parameters {{ key: {pbtxt_string(k)} value: {{ string_value: {pbtxt_string(v)} }} }}"
        for k, v in sorted(metadata_parameters(model, version).items())
    )
    meta = model.meta
    return f"""# xrwatch {meta.arch} ({meta.experiment}, {meta.precision})
# model sha256 {model.sha256}
# Research use only - not a medical device.
name: "{name}"
backend: "{backend}"
max_batch_size: {max_batch_size}
version_policy: {{ specific: {{ versions: [ {version} ] }} }}
input [
  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ 1, {size}, {size} ] }}
]
output [
{outputs}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(b) for b in preferred)} ]
  max_queue_delay_microseconds: 2000
}}
instance_group [ {{ count: {instances} kind: {kind} }} ]
{optimization}{params}
"""


def next_version(model_dir: Path) -> int:
    """The first free version number under ``model_dir`` (1 for a new model)."""
    if not model_dir.is_dir():
        return 1
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def write_python_repository(
    root: Path,
    model_path: Path,
    *,
    name: str = "xrwatch",
    max_batch_size: int = DEFAULT_MAX_BATCH,
    instances: int = 1,
) -> tuple[Path, int]:
    """Add ``model_path`` to the repository ``root`` as the next version of ``name``, served
    by Triton's Python backend with ONNX Runtime. Returns ``(root/name, version)``."""
    if not _NAME.match(name):
        raise ConfigError(f"invalid Triton model name {name!r} (letters, digits, _ . -)")
    if not 1 <= max_batch_size <= 4096:
        raise ConfigError(f"Triton max batch size must be in 1..4096, got {max_batch_size}")
    model = read_served_model(model_path)
    model_dir = root / name
    version = next_version(model_dir)
    folder = model_dir / str(version)
    folder.mkdir(parents=True)
    shutil.copyfile(model_path, folder / MODEL_FILE)
    source = Path(__file__).with_name("triton_model.py")
    shutil.copyfile(source, folder / "model.py")
    config = render_config(
        name,
        model,
        version=version,
        backend="python",
        max_batch_size=max_batch_size,
        instances=instances,
        kind="KIND_CPU",
    )
    (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
    logger.info(
        "Triton repository %s: model %s version %d (sha256 %s)",
        root,
        name,
        version,
        model.sha256[:12],
    )
    return model_dir, version


def parameters_from_config(config: dict[str, object]) -> dict[str, str]:
    """The string parameters of a model config as ``get_model_config(as_json=True)`` gives."""
    params = config.get("parameters") or {}
    if not isinstance(params, dict):
        return {}
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and isinstance(value.get("string_value"), str):
            out[str(key)] = value["string_value"]
    return out
