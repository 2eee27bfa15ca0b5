"""The ``flag`` of a result: ``""``, ``low_confidence`` or ``out_of_scope``, and why.

A flagged result keeps its label and probabilities (its status stays ``ok``); the flag says
how far to trust them:

* ``out_of_scope``: the input does not look like a frontal chest radiograph. Evidence, in
  order: the model's guard (``ood_score`` > 1: pooled features farther from the training
  images than the validation threshold - and, for a model whose guard has the layout
  check, the coarse layout too; ``contrast`` below the model's minimum: a blank or
  constant image), and for DICOM the header (Modality, BodyPartExamined, ViewPosition).
* ``low_confidence``: the calibrated top probability is below the threshold stored in the
  model (``xrwatch.calibration.low_confidence``) or set in the serve config.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

LOW_CONFIDENCE = "low_confidence"
OUT_OF_SCOPE = "out_of_scope"
FLAGS = ("", LOW_CONFIDENCE, OUT_OF_SCOPE)
ScopeGuard = Literal["combined", "features"]  # which guard score flags out_of_scope
SCOPE_GUARDS: tuple[str, ...] = get_args(ScopeGuard)
SCOPE_GUARD_HELP = (
    "out_of_scope from 'combined' (features and coarse layout both unlike the training "
    "X-rays) or 'features' (feature distance alone: catches more non-chest images, flags "
    "more chest X-rays from other hospitals)"
)

CHEST_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})  # projection radiography
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_TO_PELVIS"})
FRONTAL_VIEWS = frozenset({"PA", "AP", "APS", "APE", "POSTERO-ANTERIOR", "ANTERO-POSTERIOR"})


def header_evidence(meta: Any) -> list[str]:
    """What a DICOM header says against a frontal chest radiograph (empty when nothing)."""
    found = []
    modality = (getattr(meta, "modality", None) or "").strip().upper()
    if modality and modality not in CHEST_MODALITIES:
        found.append(f"DICOM Modality {modality} (CR/DX expected)")
    body = (getattr(meta, "body_part", None) or "").strip().upper()
    if body and body not in CHEST_BODY_PARTS:
        found.append(f"DICOM BodyPartExamined {body} (CHEST expected)")
    view = (getattr(meta, "view_position", None) or "").strip().upper()
    if view and view not in FRONTAL_VIEWS:
        found.append(f"DICOM ViewPosition {view} (PA/AP expected)")
    intent = (getattr(meta, "presentation_intent", None) or "").strip().upper()
    if intent == "FOR PROCESSING":  # DX raw detector data, not an image to read
        found.append("DICOM Presentation Intent Type FOR PROCESSING (FOR PRESENTATION expected)")
    return found


def decide(
    confidence: float,
    *,
    ood_score: float | None = None,
    contrast: float | None = None,
    image_meta: Any = None,
    low_confidence: float | None = None,
    min_contrast: float | None = None,
    layout_checked: bool = False,
) -> tuple[str, str]:
    """``(flag, reason)`` for one ok result; ``("", "")`` when nothing is wrong.

    ``None`` thresholds (a model exported without calibration or guard) disable that check.
    ``layout_checked``: the model's ``ood_score`` is the smaller of its feature and its
    coarse-layout score (both must exceed 1), which the reason then says.
    """
    evidence = []
    if contrast is not None and min_contrast is not None and contrast < min_contrast:
        evidence.append(
            f"nearly uniform image (contrast {contrast:.4f} < {min_contrast:g}): blank or constant"
        )
    if ood_score is not None and not (math.isfinite(ood_score) and ood_score <= 1.0):
        what = "features and coarse layout" if layout_checked else "features"
        evidence.append(
            f"image {what} unlike the training chest X-rays (guard score {ood_score:.2f} > 1)"
        )
    header = header_evidence(image_meta)
    if evidence or header:
        return OUT_OF_SCOPE, "; ".join(evidence + header)
    if low_confidence is not None and confidence < low_confidence:
        return LOW_CONFIDENCE, f"top probability {confidence:.3f} < {low_confidence:g}"
    return "", ""
