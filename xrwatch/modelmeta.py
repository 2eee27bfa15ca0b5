"""The metadata an exported xrwatch model carries, read back through ONNX Runtime.

``export`` writes the keys below into the ONNX file's ``metadata_props`` (see DEVELOPERS.md);
serving reads them from ``session.get_modelmeta().custom_metadata_map`` so it needs neither
the ``onnx`` package nor torch. Serving takes class names and preprocessing *only* from
here, so a model cannot be served with the wrong classes or the wrong input size.

A model lacking any of the required keys is refused with
:class:`~xrwatch.errors.ModelMetadataError` naming the file and the missing keys. The
optional keys (:data:`OPTIONAL_KEYS`: heatmaps, calibration, scope guard, population gate,
input contract) came later; a model without them still loads and serves, without heatmaps
and flags.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xrwatch.errors import ConfigError, ModelError, ModelMetadataError
from xrwatch.filehash import file_sha256 as file_sha256  # re-exported: export uses it here
from xrwatch.logs import native_stderr_to_log
from xrwatch.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"  # bump when the meaning of a key changes
PRECISIONS = ("fp32", "fp16", "int8")
TASKS = ("multiclass", "binary")

KEY_FORMAT_VERSION = "xrwatch.format_version"
KEY_CLASSES = "xrwatch.classes"
KEY_PREPROCESS = "xrwatch.preprocess"
KEY_ARCH = "xrwatch.arch"
KEY_EXPERIMENT = "xrwatch.experiment"
KEY_TASK = "xrwatch.task"
KEY_PRECISION = "xrwatch.precision"
KEY_CONFIG_SHA256 = "xrwatch.config_sha256"
KEY_METRICS = "xrwatch.metrics"
KEY_CHECKPOINT_SHA256 = "xrwatch.checkpoint_sha256"
KEY_VERSION = "xrwatch.version"
KEY_CREATED_AT = "xrwatch.created_at"
# Optional (older models lack it): ONNX Runtime's graph-optimisation level the model was
# verified at, which serving then uses too. int8 results depend on it: fusions at "all"
# compute (slightly) differently from "basic", enough to change some top-1 answers.
KEY_GRAPH_OPTIMIZATION = "xrwatch.graph_optimization"
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
DEFAULT_GRAPH_OPTIMIZATION = "all"  # what serving always used before the key existed

# Optional (JSON objects); see DEVELOPERS.md. Absent in models exported before they existed.
KEY_CAM = "xrwatch.cam"
KEY_CALIBRATION = "xrwatch.calibration"
KEY_GUARD = "xrwatch.guard"
EXPLAIN_KEYS = (KEY_CAM, KEY_CALIBRATION, KEY_GUARD)  # a model without them logs a warning
# The population gate (``population`` output: P(outside the trained population), its
# threshold, the age rule) and the input contract (range, where normalisation happens,
# resize/aspect policy, reduced-resolution decoding). Only the packaged default and models
# exported since have them; a model without them serves as before, without that flag.
KEY_POPULATION = "xrwatch.population"
KEY_INPUT = "xrwatch.input"
OPTIONAL_KEYS = (*EXPLAIN_KEYS, KEY_POPULATION, KEY_INPUT)

# Every key export always writes; all are required at load.
METADATA_KEYS = (
    KEY_FORMAT_VERSION,
    KEY_CLASSES,
    KEY_PREPROCESS,
    KEY_ARCH,
    KEY_EXPERIMENT,
    KEY_TASK,
    KEY_PRECISION,
    KEY_CONFIG_SHA256,
    KEY_METRICS,
    KEY_CHECKPOINT_SHA256,
    KEY_VERSION,
    KEY_CREATED_AT,
)


@dataclass(frozen=True)
class ModelMeta:
    """What an exported model says about itself, plus the sha256 of the model file."""

    path: str
    classes: tuple[str, ...]
    spec: PreprocessSpec
    arch: str
    experiment: str
    task: str
    precision: str
    config_sha256: str
    checkpoint_sha256: str
    version: str  # xrwatch version that exported the model
    created_at: str
    model_sha256: str
    metrics: Mapping[str, Any] = field(default_factory=dict)  # {"val": {...}, "test": {...}}
    format_version: str = FORMAT_VERSION
    graph_optimization: str = DEFAULT_GRAPH_OPTIMIZATION  # verified at; serving uses it too
    cam: Mapping[str, Any] | None = None  # xrwatch.cam: the graph has a ``cam`` output
    calibration: Mapping[str, Any] | None = None  # temperature, ECE, low_confidence
    guard: Mapping[str, Any] | None = None  # ood_score/contrast thresholds
    population: Mapping[str, Any] | None = None  # xrwatch.population: the gate
    input: Mapping[str, Any] | None = None  # xrwatch.input: the input contract

    @property
    def missing_optional(self) -> tuple[str, ...]:
        """The heatmap, calibration and guard keys this model lacks (older exports)."""
        return tuple(
            key
            for key, value in zip(
                EXPLAIN_KEYS, (self.cam, self.calibration, self.guard), strict=True
            )
            if value is None
        )

    @property
    def name(self) -> str:
        """A short human name: ``<arch>-<experiment>-<precision>``."""
        return f"{self.arch}-{self.experiment}-{self.precision}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, for reports and ``/info`` endpoints."""
        return {
            "path": self.path,
            "classes": list(self.classes),
            "preprocess": self.spec.to_dict(),
            "arch": self.arch,
            "experiment": self.experiment,
            "task": self.task,
            "precision": self.precision,
            "config_sha256": self.config_sha256,
            "checkpoint_sha256": self.checkpoint_sha256,
            "version": self.version,
            "created_at": self.created_at,
            "model_sha256": self.model_sha256,
            "metrics": dict(self.metrics),
            "format_version": self.format_version,
            "graph_optimization": self.graph_optimization,
            "cam": dict(self.cam) if self.cam is not None else None,
            "calibration": dict(self.calibration) if self.calibration is not None else None,
            "guard": dict(self.guard) if self.guard is not None else None,
            "population": dict(self.population) if self.population is not None else None,
            "input": dict(self.input) if self.input is not None else None,
        }


def _json_field(path: str, key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelMetadataError(f"{path}: metadata {key} is not valid JSON: {exc}") from exc


def parse_metadata(
    props: Mapping[str, str], *, path: str | Path, model_sha256: str = ""
) -> ModelMeta:
    """Validate the ``xrwatch.*`` metadata strings of ``path`` into a :class:`ModelMeta`.

    Raises :class:`ModelMetadataError` naming the file and every missing key, or the first
    malformed one.
    """
    where = str(path)
    missing = [key for key in METADATA_KEYS if key not in props]
    if missing:
        hint = (
            " (this does not look like a model exported by `xrwatch export`)"
            if KEY_FORMAT_VERSION in missing
            else ""
        )
        raise ModelMetadataError(f"{where}: model metadata is missing {', '.join(missing)}{hint}")
    if props[KEY_FORMAT_VERSION] != FORMAT_VERSION:
        raise ModelMetadataError(
            f"{where}: {KEY_FORMAT_VERSION} is {props[KEY_FORMAT_VERSION]!r}; this xrwatch "
            f"reads format {FORMAT_VERSION!r}"
        )

    classes = _json_field(where, KEY_CLASSES, props[KEY_CLASSES])
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ModelMetadataError(
            f"{where}: {KEY_CLASSES} must be a JSON list of at least two distinct non-empty "
            f"class names, found {props[KEY_CLASSES]!r}"
        )

    try:
        spec = PreprocessSpec.from_json(props[KEY_PREPROCESS])
    except (ConfigError, TypeError, ValueError) as exc:
        raise ModelMetadataError(f"{where}: {KEY_PREPROCESS} is invalid: {exc}") from exc

    precision = props[KEY_PRECISION]
    if precision not in PRECISIONS:
        raise ModelMetadataError(
            f"{where}: {KEY_PRECISION} must be one of {', '.join(PRECISIONS)}, found {precision!r}"
        )
    task = props[KEY_TASK]
    if task not in TASKS:
        raise ModelMetadataError(
            f"{where}: {KEY_TASK} must be one of {', '.join(TASKS)}, found {task!r}"
        )
    metrics = _json_field(where, KEY_METRICS, props[KEY_METRICS])
    if not isinstance(metrics, dict):
        raise ModelMetadataError(f"{where}: {KEY_METRICS} must be a JSON object")

    level = props.get(KEY_GRAPH_OPTIMIZATION, DEFAULT_GRAPH_OPTIMIZATION)
    if level not in GRAPH_OPTIMIZATIONS:
        raise ModelMetadataError(
            f"{where}: {KEY_GRAPH_OPTIMIZATION} must be one of {', '.join(GRAPH_OPTIMIZATIONS)}, "
            f"found {level!r}"
        )
    optional: dict[str, dict[str, Any] | None] = {}
    for key in OPTIONAL_KEYS:
        value = _json_field(where, key, props[key]) if key in props else None
        if value is not None and not isinstance(value, dict):
            raise ModelMetadataError(f"{where}: {key} must be a JSON object")
        optional[key] = value

    return ModelMeta(
        path=where,
        classes=tuple(classes),
        spec=spec,
        arch=props[KEY_ARCH],
        experiment=props[KEY_EXPERIMENT],
        task=task,
        precision=precision,
        config_sha256=props[KEY_CONFIG_SHA256],
        checkpoint_sha256=props[KEY_CHECKPOINT_SHA256],
        version=props[KEY_VERSION],
        created_at=props[KEY_CREATED_AT],
        model_sha256=model_sha256,
        metrics=metrics,
        format_version=props[KEY_FORMAT_VERSION],
        graph_optimization=level,
        cam=optional[KEY_CAM],
        calibration=optional[KEY_CALIBRATION],
        guard=optional[KEY_GUARD],
        population=optional[KEY_POPULATION],
        input=optional[KEY_INPUT],
    )


def ort_optimization_level(name: str) -> Any:
    """The ``onnxruntime.GraphOptimizationLevel`` of a :data:`GRAPH_OPTIMIZATIONS` name."""
    import onnxruntime as ort

    levels = ort.GraphOptimizationLevel
    return {
        "disable": levels.ORT_DISABLE_ALL,
        "basic": levels.ORT_ENABLE_BASIC,
        "extended": levels.ORT_ENABLE_EXTENDED,
        "all": levels.ORT_ENABLE_ALL,
    }[name]


def metadata_from_session(session: Any, path: str | Path, model_sha256: str = "") -> ModelMeta:
    """Read and validate the metadata of an open ``onnxruntime.InferenceSession``."""
    props = dict(session.get_modelmeta().custom_metadata_map)
    return parse_metadata(props, path=path, model_sha256=model_sha256)


def read_model_metadata(path: str | Path) -> ModelMeta:
    """Read and validate the metadata of the ONNX model at ``path`` (CPU session, no run)."""
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: model file not found")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        with native_stderr_to_log():
            session = ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelError(f"{p}: ONNX Runtime cannot load the model: {exc}") from exc
    return metadata_from_session(session, p, file_sha256(p))
