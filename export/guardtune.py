"""The scope guard's threshold, re-chosen on the exported variant that will actually run.

:mod:`.fitting` chooses the guard threshold on the validation images' distances computed by
torch in fp32. An int8 (or fp16) variant computes slightly different features, so its
``ood_score`` on the same images differs: on the shipped DenseNet121 64 px int8 model the
validation pass rate fell from the intended 98 % to 96.6 %, and real chest X-rays were
flagged more often than the metadata promised. :func:`tune_guard` therefore runs the
variant itself (ONNX Runtime, CPU, the graph-optimisation level serving uses) on the
validation images, rescales the graph constant ``guard_threshold`` so that the pass rate is
the target again, and records in the metadata what it measured (``tuned_on``, pass rates on
validation and test with this very file). Idempotent: a file already tuned is left alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from xrwatch import modelmeta as mm

from .explain import pass_threshold
from .verify import RUN_BATCH, ExportVerificationError, ort_optimization_level

logger = logging.getLogger(__name__)

THRESHOLD_INITIALIZER = "guard_threshold"


def _guard_outputs(path: Path, arrays: np.ndarray, level: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ood_score, contrast)`` of ``arrays`` by ONNX Runtime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort_optimization_level(level)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    scores, contrast = [], []
    for start in range(0, len(arrays), RUN_BATCH):
        s, c = session.run(["ood_score", "contrast"], {"image": arrays[start : start + RUN_BATCH]})
        scores.append(s)
        contrast.append(c)
    return np.concatenate(scores).astype(np.float64), np.concatenate(contrast).astype(np.float64)


def tune_guard(
    path: Path,
    val: np.ndarray,
    test: np.ndarray | None = None,
    *,
    precision: str,
) -> dict[str, Any] | None:
    """Re-choose ``guard_threshold`` of the model at ``path`` on its own validation scores.

    ``val``/``test``: model inputs (N x 1 x S x S) of the run's validation and test splits.
    Rewrites the file in place and returns the new guard metadata; None when the model has
    no guard. Raises :class:`ExportVerificationError` when the graph lacks the constant.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    if mm.KEY_GUARD not in props or len(val) == 0:
        return None
    guard: dict[str, Any] = json.loads(props[mm.KEY_GUARD])
    if guard.get("tuned_on"):
        return guard
    level = props.get(mm.KEY_GRAPH_OPTIMIZATION, mm.DEFAULT_GRAPH_OPTIMIZATION)
    rate = float(guard.get("target_pass_rate", 0.98))
    min_contrast = float(guard.get("min_contrast", 0.0))
    init = next((i for i in model.graph.initializer if i.name == THRESHOLD_INITIALIZER), None)
    if init is None:
        raise ExportVerificationError(f"{path}: the guard's {THRESHOLD_INITIALIZER} is missing")
    stored = numpy_helper.to_array(init)  # fp16 in an fp16 variant: keep its type and shape
    old = float(stored.reshape(-1)[0])
    val_scores, val_contrast = _guard_outputs(path, val, level)
    factor = pass_threshold(val_scores, rate)  # scores are distance / old: rescale by this
    value = np.full(stored.shape, old * factor, dtype=stored.dtype)
    new = float(value.reshape(-1)[0])
    init.CopyFrom(numpy_helper.from_array(value, init.name))

    def pass_rate(scores: np.ndarray, contrast: np.ndarray) -> float:
        """The file's pass rate once the threshold is ``new``: its scores scale by old/new."""
        return float(((scores * (old / new) <= 1.0) & (contrast >= min_contrast)).mean())

    guard.update(
        {
            "fp32_raw_threshold": guard.get("fp32_raw_threshold", guard.get("raw_threshold")),
            "raw_threshold": new,
            "tuned_on": f"{precision} onnx, validation split",
            "val_pass_rate": pass_rate(val_scores, val_contrast),
        }
    )
    if test is not None and len(test):
        guard["test_pass_rate"] = pass_rate(*_guard_outputs(path, test, level))
    for prop in model.metadata_props:
        if prop.key == mm.KEY_GUARD:
            prop.value = json.dumps(guard, sort_keys=True)
    onnx.save(model, str(path))
    logger.info(
        "%s: guard threshold re-chosen on the %s model's own validation scores: %.4g -> %.4g "
        "(validation pass %.1f%%, test pass %s)",
        path.name,
        precision,
        old,
        new,
        100 * guard["val_pass_rate"],
        f"{100 * guard['test_pass_rate']:.1f}%" if "test_pass_rate" in guard else "-",
    )
    return guard
