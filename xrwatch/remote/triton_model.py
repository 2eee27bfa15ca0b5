"""Triton Python-backend model: an exported xrwatch ONNX file run with ONNX Runtime.

:func:`xrwatch.remote.repository.write_python_repository` copies this file to
``<repo>/<name>/<version>/model.py`` beside ``model.onnx``. It runs inside Triton's Python
stub, so it imports nothing from xrwatch: only numpy (< 2: the stub's bindings are built
against numpy 1) and onnxruntime, which it finds on the stub's Python path or in the
folders named by ``XRWATCH_TRITON_SITE`` (``os.pathsep``-separated; the stub ignores
``PYTHONPATH``).

On load it checks that ``model.onnx`` is the file the config's parameters describe
(``xrwatch.model_sha256``) and refuses to load otherwise. It runs at the graph-optimisation
level the model was verified at (``xrwatch.graph_optimization``, as the local engine does),
on the CPU. Each call runs every request of Triton's dynamic batch in one ONNX Runtime run
and answers every output the config names, under the model's own input/output names.
"""

from __future__ import annotations

import hashlib
import json
import os
import site
from typing import Any

SITE_ENV = "XRWATCH_TRITON_SITE"
INPUT_NAME = "image"
LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}  # names of ort.GraphOptimizationLevel

for _folder in os.environ.get(SITE_ENV, "").split(os.pathsep):
    if _folder:
        site.addsitedir(_folder)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TritonPythonModel:
    """The interface Triton's Python backend calls (``initialize``, ``execute``)."""

    def initialize(self, args: dict[str, str]) -> None:
        import numpy as np
        import onnxruntime as ort

        self.np = np
        config = json.loads(args["model_config"])
        params = {
            key: value.get("string_value", "")
            for key, value in (config.get("parameters") or {}).items()
        }
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        expected = params.get("xrwatch.model_sha256")
        found = _sha256(path)
        if expected != found:
            raise ValueError(
                f"{path}: sha256 {found} but the config's xrwatch.model_sha256 is {expected!r}"
            )
        if params.get("xrwatch.model_version") != args["model_version"]:
            raise ValueError(
                f"{path}: the config describes version {params.get('xrwatch.model_version')!r}, "
                f"this is version {args['model_version']!r}"
            )
        options = ort.SessionOptions()
        level = LEVELS[params.get("xrwatch.graph_optimization", "all")]
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        threads = int(params.get("xrwatch.server_threads", "0") or 0)
        options.intra_op_num_threads = threads  # 0 = ONNX Runtime's default
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.outputs = [out["name"] for out in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        np = self.np
        try:
            arrays = [
                pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
                for request in requests
            ]
            values = self.session.run(
                self.outputs, {INPUT_NAME: np.ascontiguousarray(np.concatenate(arrays))}
            )
        except Exception as exc:  # answer every request with the error; the server lives on
            error = pb_utils.TritonError(f"xrwatch model: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = []
        start = 0
        for array in arrays:
            stop = start + int(array.shape[0])
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(value[start:stop], dtype=np.float32))
                for name, value in zip(self.outputs, values, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses
