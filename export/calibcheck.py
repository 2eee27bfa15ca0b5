"""The calibration figures, measured on the exported variant that will actually run.

:mod:`.fitting` fits the temperature on the validation logits of the torch network in fp32
and computes the ECE before and after from those same logits. The file that serves is an
ONNX variant (int8 for the shipped default) whose logits differ a little, so
:func:`measure_calibration` runs the variant itself (ONNX Runtime, CPU, the
graph-optimisation level serving uses) on the validation and test images and records in
its metadata the ECE this very file gives: before (softmax of its ``logits``, T = 1) and
after (its own ``probabilities``, the temperature included), each with a 95 % bootstrap
interval, and the interval of the paired change (:func:`ece_intervals`). The torch figures
stay, under ``fp32_ece``. The temperature itself is not re-fitted. Idempotent: a file
already measured is left alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xrwatch import modelmeta as mm
from xrwatch.engine import LOGITS, PROBABILITIES
from xrwatch_training.calibration import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    ECE_BINS,
    ece_intervals,
    expected_calibration_error,
    softmax,
)

from .onnx_export import save_single_file, set_json_metadata, xrwatch_metadata
from .verify import run_outputs

logger = logging.getLogger(__name__)


def measure_calibration(
    path: Path,
    splits: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    precision: str,
) -> dict[str, Any] | None:
    """Record the ECE of the model at ``path`` itself on ``splits``: ``(name, model inputs
    N x 1 x S x S, labels N)``, e.g. validation and test. Rewrites the file's calibration
    metadata in place and returns it; None when the model has no calibration."""
    import onnx

    model = onnx.load(str(path))
    props = xrwatch_metadata(model)
    if mm.KEY_CALIBRATION not in props:
        return None
    cal: dict[str, Any] = json.loads(props[mm.KEY_CALIBRATION])
    if cal.get("measured_on"):
        return cal
    level = props.get(mm.KEY_GRAPH_OPTIMIZATION, mm.DEFAULT_GRAPH_OPTIMIZATION)
    bins = int(cal.get("bins", ECE_BINS))
    ece: dict[str, Any] = {}
    for name, arrays, labels in splits:
        if len(labels) == 0:
            continue
        logits, after = run_outputs(path, arrays, level, [LOGITS, PROBABILITIES])
        before = softmax(logits)
        ece[name] = {
            "before": expected_calibration_error(before, labels, bins),
            "after": expected_calibration_error(after, labels, bins),
            "n": len(labels),
            **{
                f"interval_{key}": value
                for key, value in ece_intervals(before, after, labels, bins=bins).items()
            },
        }
    cal.update(
        {
            "fp32_ece": cal.get("fp32_ece", cal.get("ece")),
            "ece": ece,
            "measured_on": f"{precision} onnx",
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95},
        }
    )
    set_json_metadata(model, mm.KEY_CALIBRATION, cal)
    save_single_file(model, path)
    logger.info(
        "%s: ECE measured on the %s model itself: %s",
        path.name,
        precision,
        "; ".join(
            f"{name} {e['before']:.3f} -> {e['after']:.3f} (change {e['interval_change'][0]:+.3f}"
            f" to {e['interval_change'][1]:+.3f})"
            for name, e in ece.items()
        ),
    )
    return cal
