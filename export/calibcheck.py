"""The calibration figures, measured on the exported variant that will actually run.

:mod:`.fitting` fits the temperature on the validation logits of the torch network in fp32
and computes the ECE before and after from those same logits. The file that serves is an
ONNX variant (int8 for the shipped default) whose logits differ a little, so
:func:`measure_calibration` takes the variant's own outputs on the validation and test
images (:func:`.verify.file_outputs`: ONNX Runtime, CPU, the graph-optimisation level
serving uses) and records in its metadata the ECE this very file gives: before (softmax of
its ``logits``, T = 1) and after (its own ``probabilities``, the temperature included), each
with a 95 % bootstrap interval, and the interval of the paired change
(:func:`ece_intervals`). The torch figures stay, under ``fp32_ece``. The temperature itself
is not re-fitted. Idempotent: a file already measured is left alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xrwatch import modelmeta as mm
from xrwatch.engine import LOGITS, PROBABILITIES
from xrwatch_training.calibration import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    ECE_BINS,
    ece_entry,
    ece_intervals,
    softmax,
)

from .onnx_export import save_single_file, set_json_metadata, xrwatch_metadata

logger = logging.getLogger(__name__)

CALIBRATION_OUTPUTS = (LOGITS, PROBABILITIES)  # what measure_calibration reads of a file


def measure_calibration(
    path: Path,
    outputs: Mapping[str, Mapping[str, np.ndarray]],
    labels: Mapping[str, np.ndarray],
    *,
    precision: str,
) -> dict[str, Any] | None:
    """Record the ECE of the model at ``path`` itself on each split of ``outputs`` (what this
    file outputs there, :func:`.verify.file_outputs` with :data:`CALIBRATION_OUTPUTS`,
    e.g. validation and test) against that split's ``labels``. Rewrites the file's
    calibration metadata in place and returns it; None when the model has no calibration."""
    import onnx

    model = onnx.load(str(path))
    props = xrwatch_metadata(model)
    if mm.KEY_CALIBRATION not in props:
        return None
    cal: dict[str, Any] = json.loads(props[mm.KEY_CALIBRATION])
    if cal.get("measured_on"):
        return cal
    bins = int(cal.get("bins", ECE_BINS))
    ece: dict[str, Any] = {}
    for name, out in outputs.items():
        truth = labels[name]
        if len(truth) == 0:
            continue
        before, after = softmax(out[LOGITS]), out[PROBABILITIES]
        ece[name] = {
            **ece_entry(before, after, truth, bins),
            **{
                f"interval_{key}": value
                for key, value in ece_intervals(before, after, truth, bins=bins).items()
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
