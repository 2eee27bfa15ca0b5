"""What an exported file states about its input and its population, and a chosen temperature.

* ``xrwatch.input``: the input contract, exactly: ``image`` float32 N x 1 x S x S in [0, 1]
  (bright = dense), produced by :func:`xrwatch.preprocess.load_model_input` (reduced-
  resolution decoding, then the spec's resize and aspect policy); channel replication and
  normalisation happen *inside* the graph, so nothing is to be applied outside it. For that
  reason ``xrwatch.preprocess`` no longer lists ``mean``/``std`` (readers fill in the
  defaults they never apply; older xrwatch versions read it unchanged).
* ``xrwatch.population`` (checkpoints with population units, :mod:`training.pool`): the
  ``population`` output, its threshold and the age rule (:mod:`xrwatch.flags`).
* :func:`with_temperature`: the fitted calibration with another temperature shipped (1 when
  temperature scaling did not lower held-out NLL), the reason recorded beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from xrwatch import modelmeta as mm
from xrwatch.engine import POPULATION
from xrwatch.flags import ADULT_AGE_YEARS
from xrwatch.preprocess import DRAFT_HEADROOM, PreprocessSpec
from xrwatch_training.models import population_classes

from .fitting import Fitted

logger = logging.getLogger(__name__)

POPULATION_THRESHOLD = 0.5  # P(adult) at or above which a film without an age is flagged


def weights_sha256(model_path: Path) -> str:
    """sha256 over an ONNX file's initializers (name, dtype, shape, bytes; sorted by name):
    its weights, independent of metadata such as the creation time, so a rebuild from the
    same checkpoint has the same hash."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    h = hashlib.sha256()
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        a = numpy_helper.to_array(t)
        h.update(f"{t.name}|{a.dtype}|{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def input_contract(spec: PreprocessSpec) -> dict[str, Any]:
    """The ``xrwatch.input`` object of a model with preprocessing ``spec``."""
    aspect = (
        "stretched to a square (aspect ratio not kept, as in training: every input is "
        "squared, so no source's aspect ratio is a trait to learn)"
        if spec.aspect == "stretch"
        else "letterboxed: scaled to fit, centred on black"
    )
    return {
        "tensor": "image",
        "shape": ["N", 1, spec.size, spec.size],
        "dtype": "float32",
        "range": [0.0, 1.0],
        "polarity": "bright = dense (MONOCHROME1 inverted, VOI window applied when present)",
        "normalisation": "inside the graph (channel replication and per-channel mean/std); "
        "apply nothing outside",
        "resize": spec.resize,
        "aspect": spec.aspect,
        "aspect_policy": aspect,
        "decoding": f"reduced resolution allowed: JPEG draft mode / DICOM block averages to a "
        f"shorter side >= {DRAFT_HEADROOM:g} x {spec.size} px before the final resize",
        "reader": "xrwatch.preprocess.load_model_input",
    }


def preprocess_json(spec: PreprocessSpec) -> str:
    """``xrwatch.preprocess`` without ``mean``/``std`` (applied inside the graph only)."""
    d = spec.to_dict()
    d.pop("mean")
    d.pop("std")
    return json.dumps(d, sort_keys=True)


def contract_metadata(ckpt: dict[str, Any], threshold: float) -> dict[str, str]:
    """``xrwatch.input``, the trimmed ``xrwatch.preprocess`` and, for a checkpoint with
    population units, ``xrwatch.population``."""
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    out = {
        mm.KEY_INPUT: json.dumps(input_contract(spec), sort_keys=True),
        mm.KEY_PREPROCESS: preprocess_json(spec),
    }
    units = population_classes(ckpt)
    if units:
        info = ckpt.get("population") or {}
        out[mm.KEY_POPULATION] = json.dumps(
            {
                "output": POPULATION,
                "classes": units,
                "score": f"P({'/'.join(units)}) under the softmax over every unit",
                "threshold": threshold,
                "adult_age_years": ADULT_AGE_YEARS,
                "age_rule": "DICOM PatientAge (else PatientBirthDate + StudyDate) decides "
                "when present: >= adult_age_years flags, below never flags; the image "
                "score decides only without an age",
                "trained_on": info.get("trained_on", ""),
                "population": info.get("population") or _stated_population(ckpt),
            },
            sort_keys=True,
        )
    return out


def _stated_population(ckpt: dict[str, Any]) -> str:
    """The default recipe's population, for its checkpoints that do not state it."""
    from xrwatch_training.default_recipe import EXPERIMENT
    from xrwatch_training.pool import POPULATION as PAEDIATRIC

    return PAEDIATRIC if ckpt.get("experiment") == EXPERIMENT else ""


def with_temperature(fitted: Fitted, temperature: float, reason: str) -> Fitted:
    """``fitted`` shipping ``temperature`` instead of its own, ``reason`` recorded. The ECE
    of the fitted temperature moves to ``ece_at_fitted_temperature``; each written file's
    own ECE is then measured with the shipped one (:mod:`.calibcheck`)."""
    meta = dict(fitted.calibration_meta)
    meta.update(
        temperature=temperature,
        fitted_temperature=fitted.temperature,
        temperature_reason=reason,
        ece_at_fitted_temperature=meta.pop("ece", {}),
        ece={},
    )
    logger.info("shipping temperature %.4f instead of %.4f: %s", temperature,
                fitted.temperature, reason)  # fmt: skip
    return replace(fitted, temperature=temperature, calibration_meta=meta)
