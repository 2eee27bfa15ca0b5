"""The scope guard's threshold, re-chosen on the exported variant that will actually run.

:mod:`.fitting` chooses the guard threshold on the validation images' distances computed by
torch in fp32. An int8 (or fp16) variant computes slightly different features, so its
``ood_score`` on the same images differs: on the shipped DenseNet121 64 px int8 model the
validation pass rate fell from the intended 98 % to 96.6 %, and real chest X-rays were
flagged more often than the metadata promised. :func:`tune_guard` therefore takes the
variant's own scores on the validation images (:func:`.verify.file_outputs`: ONNX Runtime,
CPU, the graph-optimisation level serving uses), rescales the graph constant
``guard_threshold`` so that the pass rate is the target again, and records in the metadata
what it measured (``tuned_on``, pass rates on validation and test with this very file). A
guard with the coarse-layout check has two thresholds (``guard_threshold`` for
``feature_score``, ``layout_threshold`` for ``layout_score``); each is re-chosen on its own
score, as :mod:`.fitting` chose it. Idempotent: a file already tuned is left alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xrwatch import modelmeta as mm
from xrwatch.engine import CONTRAST, GUARD_OUTPUTS, LAYOUT_OUTPUTS

from .explain import guard_passes, pass_threshold
from .onnx_export import save_single_file, set_json_metadata, xrwatch_metadata
from .verify import ExportVerificationError

logger = logging.getLogger(__name__)

GUARD_SCORES = (*GUARD_OUTPUTS, *LAYOUT_OUTPUTS)  # what tune_guard reads of a file's outputs
THRESHOLD_INITIALIZER = "guard_threshold"
LAYOUT_THRESHOLD_INITIALIZER = "layout_threshold"


def tune_guard(
    path: Path,
    outputs: Mapping[str, Mapping[str, np.ndarray]],
    *,
    precision: str,
) -> dict[str, Any] | None:
    """Re-choose ``guard_threshold`` of the model at ``path`` on its own validation scores.

    ``outputs``: what this file outputs on the run's splits (:func:`.verify.file_outputs`
    with :data:`GUARD_SCORES`): ``"val"``, and ``"test"`` when there is one. Rewrites the
    file in place and returns the new guard metadata; None when the model has no guard.
    Raises :class:`ExportVerificationError` when the graph lacks a constant or an output.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    props = xrwatch_metadata(model)
    if mm.KEY_GUARD not in props or "val" not in outputs:
        return None
    guard: dict[str, Any] = json.loads(props[mm.KEY_GUARD])
    if guard.get("tuned_on"):
        return guard
    rate = float(guard.get("target_pass_rate", 0.98))
    min_contrast = float(guard.get("min_contrast", 0.0))
    combine = str(guard.get("combine", "both"))
    layout = guard.get("layout")
    names = [THRESHOLD_INITIALIZER] + ([LAYOUT_THRESHOLD_INITIALIZER] if layout else [])
    inits = {i.name: i for i in model.graph.initializer if i.name in names}
    for name in names:
        if name not in inits:
            raise ExportVerificationError(f"{path}: the guard's {name} is missing")
    scores = [*LAYOUT_OUTPUTS, CONTRAST] if layout else list(GUARD_OUTPUTS)
    missing = [name for name in scores if name not in outputs["val"]]
    if missing:
        raise ExportVerificationError(f"{path}: the guard's outputs {missing} are missing")
    val_out = np.stack([outputs["val"][name] for name in scores])
    old, new = np.ones(len(names)), np.ones(len(names))
    for k, name in enumerate(names):
        stored = numpy_helper.to_array(inits[name])  # fp16 in an fp16 variant: keep its type
        old[k] = float(stored.reshape(-1)[0])
        factor = pass_threshold(val_out[k], rate)  # scores are distance / old: rescale
        value = np.full(stored.shape, old[k] * factor, dtype=stored.dtype)
        new[k] = float(value.reshape(-1)[0])
        inits[name].CopyFrom(numpy_helper.from_array(value, name))

    def pass_rate(out: np.ndarray) -> float:
        """The file's pass rate once the thresholds are ``new``: scores scale by old/new."""
        scaled = out[:-1] * (old / new)[:, None]
        return float(guard_passes(scaled, out[-1], min_contrast, combine).mean())

    guard.update(
        {
            "fp32_raw_threshold": guard.get("fp32_raw_threshold", guard.get("raw_threshold")),
            "raw_threshold": new[0],
            "tuned_on": f"{precision} onnx, validation split",
            "val_pass_rate": pass_rate(val_out),
        }
    )
    if layout:
        layout["fp32_raw_threshold"] = layout.get("fp32_raw_threshold", layout["raw_threshold"])
        layout["raw_threshold"] = new[1]
    if "test" in outputs:
        guard["test_pass_rate"] = pass_rate(np.stack([outputs["test"][name] for name in scores]))
    set_json_metadata(model, mm.KEY_GUARD, guard)
    save_single_file(model, path)
    logger.info(
        "%s: guard threshold(s) re-chosen on the %s model's own validation scores: %s -> %s "
        "(validation pass %.1f%%, test pass %s)",
        path.name,
        precision,
        ", ".join(f"{v:.4g}" for v in old),
        ", ".join(f"{v:.4g}" for v in new),
        100 * guard["val_pass_rate"],
        f"{100 * guard['test_pass_rate']:.1f}%" if "test_pass_rate" in guard else "-",
    )
    return guard
