"""The result of reading an image: pixels plus the metadata reports carry."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

# Decompression-bomb guard: 100 megapixels is far above any chest radiograph
# (a 43 x 43 cm detector at 0.1 mm pixels is ~18.5 MP).
MAX_PIXELS = 100_000_000

ImageKind = Literal["dicom", "png", "jpeg"]


@dataclass(frozen=True)
class ImageMeta:
    """What reports say about a file. Never holds patient names, IDs or birth dates."""

    path: str
    kind: ImageKind
    width: int  # original width in pixels, before any draft-mode reduction
    height: int  # original height in pixels
    source_mode: str = ""  # e.g. "L", "I;16", "RGB", "uint16/12-bit"
    decoded_width: int = 0  # width of ``pixels`` (smaller than width in draft mode)
    decoded_height: int = 0
    modality: str | None = None
    photometric: str | None = None
    transfer_syntax: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    accession_number: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    # DX PresentationIntentType: "FOR PROCESSING" (raw detector data, not an image to read;
    # xrwatch.flags raises out_of_scope) or "FOR PRESENTATION". An image attribute, not
    # patient data, shown by ``inspect``; not a column of the reports.
    presentation_intent: str | None = None
    # DICOM PatientAge, else PatientBirthDate with StudyDate, as years (xrwatch.flags:
    # the population gate); the dates themselves are never kept. Not in reports.
    patient_age_years: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("patient_age_years")
        return d


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: float32 2-D ``pixels`` in [0, 1] and its :class:`ImageMeta`."""

    pixels: np.ndarray
    meta: ImageMeta
