"""The ONNX metadata contract: written by export, read back by xrwatch.modelmeta."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xrwatch import modelmeta as mm
from xrwatch.errors import ModelError, ModelMetadataError
from xrwatch.preprocess import PreprocessSpec

ROOT = Path(__file__).resolve().parents[2]


def _props(**override: str) -> dict[str, str]:
    props = {
        mm.KEY_FORMAT_VERSION: "1",
        mm.KEY_CLASSES: json.dumps(["Normal", "Pneumonia"]),
        mm.KEY_PREPROCESS: PreprocessSpec(size=64).to_json(),
        mm.KEY_ARCH: "resnet50",
        mm.KEY_EXPERIMENT: "PRCE",
        mm.KEY_TASK: "binary",
        mm.KEY_PRECISION: "fp32",
        mm.KEY_CONFIG_SHA256: "c" * 64,
        mm.KEY_METRICS: json.dumps({"val": {"balanced_accuracy": 0.9}, "test": None}),
        mm.KEY_CHECKPOINT_SHA256: "a" * 64,
        mm.KEY_VERSION: "0.1.0",
        mm.KEY_CREATED_AT: "2026-01-01T00:00:00+00:00",
    }
    props.update(override)
    return props


def _rewrite_metadata(src: Path, dst: Path, props: dict[str, str] | None) -> Path:
    """Copy ``src`` to ``dst`` with its xrwatch metadata replaced (None: removed)."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(src))
    keep = [p for p in model.metadata_props if not p.key.startswith("xrwatch.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in (props or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))
    return dst


def test_parse_valid_metadata() -> None:
    meta = mm.parse_metadata(_props(), path="m.onnx", model_sha256="f" * 64)
    assert meta.classes == ("Normal", "Pneumonia")
    assert meta.spec == PreprocessSpec(size=64)
    assert (meta.arch, meta.experiment, meta.task, meta.precision) == (
        "resnet50",
        "PRCE",
        "binary",
        "fp32",
    )
    assert meta.metrics["val"]["balanced_accuracy"] == 0.9
    assert meta.model_sha256 == "f" * 64
    assert meta.name == "resnet50-PRCE-fp32"
    assert json.loads(json.dumps(meta.to_dict()))["preprocess"]["size"] == 64


def test_missing_keys_are_named_with_the_file() -> None:
    props = _props()
    del props[mm.KEY_CLASSES]
    del props[mm.KEY_CHECKPOINT_SHA256]
    with pytest.raises(ModelMetadataError) as err:
        mm.parse_metadata(props, path="/models/x.onnx")
    msg = str(err.value)
    assert "/models/x.onnx" in msg
    assert mm.KEY_CLASSES in msg and mm.KEY_CHECKPOINT_SHA256 in msg
    assert mm.KEY_ARCH not in msg


def test_no_metadata_at_all_says_not_an_xrwatch_model() -> None:
    with pytest.raises(ModelMetadataError, match="not look like a model exported"):
        mm.parse_metadata({}, path="foreign.onnx")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (mm.KEY_FORMAT_VERSION, "2", "reads format"),
        (mm.KEY_CLASSES, "Normal,Pneumonia", "not valid JSON"),
        (mm.KEY_CLASSES, json.dumps(["Normal"]), "at least two"),
        (mm.KEY_CLASSES, json.dumps(["A", "A"]), "distinct"),
        (mm.KEY_PREPROCESS, json.dumps({"size": 64, "version": 99}), "preprocess"),
        (mm.KEY_PREPROCESS, json.dumps({"size": 64, "colour": "rgb"}), "unknown"),
        (mm.KEY_PRECISION, "int4", "precision"),
        (mm.KEY_TASK, "regression", "task"),
        (mm.KEY_METRICS, "[1, 2]", "JSON object"),
    ],
)
def test_malformed_metadata_is_refused(key: str, value: str, match: str) -> None:
    with pytest.raises(ModelMetadataError, match=match) as err:
        mm.parse_metadata(_props(**{key: value}), path="bad.onnx")
    assert "bad.onnx" in str(err.value)


def test_round_trip_through_an_exported_model(tiny_onnx_model: Path) -> None:
    meta = mm.read_model_metadata(tiny_onnx_model)
    assert meta.classes == ("Normal", "Bacteria", "Virus", "COVID-19")
    assert meta.spec == PreprocessSpec(size=32)
    assert (meta.arch, meta.experiment, meta.task, meta.precision) == (
        "tinycnn",
        "custom",
        "multiclass",
        "fp32",
    )
    assert meta.model_sha256 == hashlib.sha256(tiny_onnx_model.read_bytes()).hexdigest()
    assert len(meta.checkpoint_sha256) == 64 and len(meta.config_sha256) == 64
    assert meta.metrics["val"]["balanced_accuracy"] == pytest.approx(0.5)
    assert meta.version and meta.created_at.startswith("20")


def test_model_without_metadata_is_refused(tiny_onnx_model: Path, tmp_path: Path) -> None:
    bare = _rewrite_metadata(tiny_onnx_model, tmp_path / "bare.onnx", None)
    with pytest.raises(ModelMetadataError) as err:
        mm.read_model_metadata(bare)
    assert str(bare) in str(err.value)
    for key in (mm.KEY_FORMAT_VERSION, mm.KEY_CLASSES, mm.KEY_PREPROCESS):
        assert key in str(err.value)


def test_model_missing_one_key_is_refused(tiny_onnx_model: Path, tmp_path: Path) -> None:
    full = {
        p.key: p.value
        for p in pytest.importorskip("onnx").load(str(tiny_onnx_model)).metadata_props
    }
    del full[mm.KEY_PREPROCESS]
    partial = _rewrite_metadata(tiny_onnx_model, tmp_path / "partial.onnx", full)
    with pytest.raises(ModelMetadataError, match=mm.KEY_PREPROCESS):
        mm.read_model_metadata(partial)


def test_unreadable_model_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        mm.read_model_metadata(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not protobuf" * 10)
    with pytest.raises(ModelError, match=r"junk\.onnx"):
        mm.read_model_metadata(junk)


def test_serving_path_imports_neither_torch_nor_onnx(tiny_onnx_model: Path) -> None:
    code = (
        "import sys\n"
        "from xrwatch.engine import InferenceEngine\n"
        "import xrwatch.modelmeta, xrwatch.cli.classify_cmd\n"
        "import numpy as np\n"
        f"e = InferenceEngine({str(tiny_onnx_model)!r})\n"
        "e.predict_arrays(np.zeros((1, 32, 32), np.float32))\n"
        "heavy = ('torch', 'onnx', 'xrwatch_training', 'xrwatch_export')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_copied_model_keeps_metadata(tiny_onnx_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(tiny_onnx_model, copy)
    assert mm.read_model_metadata(copy).classes == mm.read_model_metadata(tiny_onnx_model).classes
