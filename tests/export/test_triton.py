"""The Triton model repository: layout, and a config.pbtxt that parses and fits the model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from xrwatch.errors import ConfigError
from xrwatch.modelmeta import read_model_metadata
from xrwatch_export.pipeline import ExportResult
from xrwatch_export.triton import write_repository

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def parse_pbtxt(text: str) -> dict[str, Any]:
    """A protobuf text-format parser, enough for Triton configs (repeated fields → lists)."""
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"cannot tokenize at {text[pos : pos + 20]!r}")
        pos = m.end()
        if m.group(1) is None and m.group(0).strip():
            tokens.append(m.group(0).strip())

    def scalar(tok: str) -> Any:
        if tok.startswith('"'):
            return tok[1:-1]
        for cast in (int, float):
            try:
                return cast(tok)
            except ValueError:
                pass
        return tok  # an enum name such as TYPE_FP32

    def message(i: int, end: str | None) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        while i < len(tokens) and tokens[i] != end:
            key = tokens[i]
            i += 1
            if tokens[i] == ":":
                i += 1
            if tokens[i] == "{":
                value, i = message(i + 1, "}")
                i += 1
            elif tokens[i] == "[":
                value, i = [], i + 1
                while tokens[i] != "]":
                    if tokens[i] == "{":
                        item, i = message(i + 1, "}")
                        value.append(item)
                    else:
                        value.append(scalar(tokens[i]))
                    i += 1
                    if tokens[i] == ",":
                        i += 1
                i += 1
            else:
                value, i = scalar(tokens[i]), i + 1
            out.setdefault(key, []).append(value)
        return {k: v[0] if len(v) == 1 else v for k, v in out.items()}, i

    parsed, _ = message(0, None)
    return parsed


def test_repository_layout_and_config(full_export: ExportResult) -> None:
    assert full_export.triton is not None
    model_dir = full_export.triton
    fp32 = full_export.variant("fp32")
    served = model_dir / "1" / "model.onnx"
    assert served.read_bytes() == fp32.path.read_bytes()
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert config["name"] == model_dir.name == "xrwatch"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 32
    assert "dynamic_batching" in config
    assert max(config["dynamic_batching"]["preferred_batch_size"]) <= config["max_batch_size"]
    (inp,) = config["input"]
    assert inp == {"name": "image", "data_type": "TYPE_FP32", "dims": [1, 64, 64]}
    outputs = {o["name"]: o for o in config["output"]}
    assert {"logits", "probabilities", "cam"} <= set(outputs)  # every output of the file
    for name in ("logits", "probabilities"):
        assert outputs[name]["dims"] == [len(full_export.meta.classes)]
    assert all(out["data_type"] == "TYPE_FP32" for out in outputs.values())
    params = {p["key"]: p["value"]["string_value"] for p in config["parameters"]}
    assert params["xrwatch.model_sha256"] == fp32.sha256  # for xrwatch's --triton clients
    assert params["xrwatch.model_version"] == "1"
    assert config["version_policy"] == {"specific": {"versions": [1]}}
    labels = (model_dir / outputs["probabilities"]["label_filename"]).read_text().splitlines()
    assert labels == list(full_export.meta.classes)


def test_config_matches_the_onnx_graph(full_export: ExportResult) -> None:
    import onnx

    assert full_export.triton is not None
    config = parse_pbtxt((full_export.triton / "config.pbtxt").read_text())
    model = onnx.load(str(full_export.triton / "1" / "model.onnx"))
    graph_dims = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim][1:]
        for v in [*model.graph.input, *model.graph.output]
    }
    for entry in [*config["input"], *config["output"]]:
        # one value per image ([N] in the graph) is declared [1] reshaped to []
        dims = entry.get("reshape", {}).get("shape", entry["dims"])
        assert graph_dims[entry["name"]] == dims
    assert {e["name"] for e in config["output"]} == {o.name for o in model.graph.output}


def test_second_export_adds_a_version(full_export: ExportResult, tmp_path: Path) -> None:
    int8 = full_export.variant("int8").path
    meta = read_model_metadata(int8)
    first = write_repository(tmp_path, int8, meta, name="xr-int8", max_batch_size=8)
    second = write_repository(tmp_path, int8, meta, name="xr-int8", max_batch_size=8)
    assert first == second
    assert sorted(p.name for p in first.iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]
    config = parse_pbtxt((first / "config.pbtxt").read_text())
    assert config["max_batch_size"] == 8 and config["dynamic_batching"]["preferred_batch_size"] == [
        4,
        8,
    ]
    with pytest.raises(ConfigError, match="model name"):
        write_repository(tmp_path, int8, meta, name="../evil")
