"""The ``flag`` of a result: ``""``, ``low_confidence``, ``out_of_population`` or
``out_of_scope``, and why.

A flagged result keeps its label and probabilities (its status stays ``ok``); the flag says
how far to trust them:

* ``out_of_scope``: the input does not look like a frontal chest radiograph. Evidence, in
  order: the model's guard (``ood_score`` > 1: pooled features farther from the training
  images than the validation threshold - and, for a model whose guard has the layout
  check, the coarse layout too; ``contrast`` below the model's minimum: a blank or
  constant image), and for DICOM the header (Modality, BodyPartExamined, ViewPosition).
* ``out_of_population``: a chest radiograph, but not of the population the model was
  trained on (the packaged default: children aged 1-5). Evidence: the DICOM patient age
  (PatientAge, else PatientBirthDate with StudyDate) at or above the model's adult age
  (18 y); without an age, the model's ``population`` output (P(adult)) at or above its
  threshold. An age below it overrides the image: a child's film is never flagged for
  looking adult.
* ``low_confidence``: the calibrated top probability is below the threshold stored in the
  model (``xrwatch.calibration.low_confidence``) or set in the serve config.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any, Literal, get_args

LOW_CONFIDENCE = "low_confidence"
OUT_OF_SCOPE = "out_of_scope"
OUT_OF_POPULATION = "out_of_population"
FLAGS = ("", LOW_CONFIDENCE, OUT_OF_POPULATION, OUT_OF_SCOPE)
ADULT_AGE_YEARS = 18.0  # default; a model's xrwatch.population may state its own
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
ScopeGuard = Literal["combined", "features"]  # which guard score flags out_of_scope
SCOPE_GUARDS: tuple[str, ...] = get_args(ScopeGuard)
SCOPE_GUARD_HELP = (
    "out_of_scope from 'combined' (the model's own rule over features and coarse layout: "
    "both unlike the training X-rays, or for a model whose guard combines with 'either' - the "
    "packaged default - either one) or 'features' (the feature distance alone)"
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


def age_years(
    patient_age: str | None, birth_date: str | None = None, study_date: str | None = None
) -> float | None:
    """The patient's age in years from DICOM PatientAge (``nnnD/W/M/Y``), else from
    PatientBirthDate and StudyDate (``YYYYMMDD``); None when neither gives one. Only the
    age leaves this function, never the dates."""
    if patient_age and (m := _AGE.match(str(patient_age))):
        return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()]
    try:
        born = dt.datetime.strptime(str(birth_date or "").strip()[:8], "%Y%m%d").date()
        seen = dt.datetime.strptime(str(study_date or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None
    days = (seen - born).days
    return days / 365.25 if 0 <= days < 150 * 366 else None


def population_evidence(
    *,
    patient_age: float | None,
    population: float | None,
    threshold: float | None,
    adult_age: float = ADULT_AGE_YEARS,
) -> str:
    """Why a film is outside the trained population, or ``""``: the DICOM age decides when
    there is one (either way); else the image's ``population`` score against ``threshold``."""
    if patient_age is not None:
        if patient_age >= adult_age:
            return f"DICOM patient age {patient_age:.0f} y >= {adult_age:g} y (model for children)"
        return ""
    if population is not None and threshold is not None and population >= threshold:
        return (
            f"image looks like an adult film (population score {population:.2f} >= "
            f"{threshold:g}; no DICOM age)"
        )
    return ""


def decide(
    confidence: float,
    *,
    ood_score: float | None = None,
    contrast: float | None = None,
    image_meta: Any = None,
    low_confidence: float | None = None,
    min_contrast: float | None = None,
    layout_checked: bool = False,
    layout_either: bool = False,
    population: float | None = None,
    population_threshold: float | None = None,
    adult_age: float = ADULT_AGE_YEARS,
) -> tuple[str, str]:
    """``(flag, reason)`` for one ok result; ``("", "")`` when nothing is wrong.

    ``None`` thresholds (a model exported without calibration, guard or population gate)
    disable that check. ``layout_checked``: the model's ``ood_score`` is the smaller of its
    feature and its coarse-layout score (both must exceed 1), or with ``layout_either`` the
    larger (either may exceed 1), which the reason then says. Order: ``out_of_scope`` (not a
    frontal chest radiograph), ``out_of_population``, ``low_confidence``. The patient's age
    comes from ``image_meta.patient_age_years`` and only counts for a model with a population
    gate (``population_threshold`` set).
    """
    evidence = []
    if contrast is not None and min_contrast is not None and contrast < min_contrast:
        evidence.append(
            f"nearly uniform image (contrast {contrast:.4f} < {min_contrast:g}): blank or constant"
        )
    if ood_score is not None and not (math.isfinite(ood_score) and ood_score <= 1.0):
        what = (
            ("features or coarse layout" if layout_either else "features and coarse layout")
            if layout_checked
            else "features"
        )
        evidence.append(
            f"image {what} unlike the training chest X-rays (guard score {ood_score:.2f} > 1)"
        )
    header = header_evidence(image_meta)
    why = ""
    if population_threshold is not None:
        why = population_evidence(
            patient_age=getattr(image_meta, "patient_age_years", None),
            population=population,
            threshold=population_threshold,
            adult_age=adult_age,
        )
    if evidence or header:  # an adult's film unlike the training films says both
        return OUT_OF_SCOPE, "; ".join(evidence + header + ([why] if why else []))
    if why:
        return OUT_OF_POPULATION, why
    if low_confidence is not None and confidence < low_confidence:
        return LOW_CONFIDENCE, f"top probability {confidence:.3f} < {low_confidence:g}"
    return "", ""
