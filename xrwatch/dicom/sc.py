"""The heatmap overlay of one result as a DICOM Secondary Capture (built with highdicom).

Made only when the result has a heatmap (``record["heatmap"]``: a PNG under REPORTS,
written by the daemon for models with a ``cam`` output). It joins the source's study (every
patient and study attribute copied, Issuer of Patient ID included, in the source's
character set), in one overlay series per study and model; its UIDs derive from the source
and the model (:mod:`xrwatch.dicom.uids`), so writing or sending it again never makes a
second instance.

It is marked as xrwatch's own, so that xrwatch never classifies it when a PACS routes the
study back: Manufacturer ``xrwatch``, Software Versions ``xrwatch <version>``, Image Type
``DERIVED\\SECONDARY``, SOP Instance UID under the xrwatch UID root. The overlay shows the
model's input, not the original image; a banner burned into the pixels says that it is for
research use only, so no viewer shows it without that warning.

The model input is the source resized (and cropped), never flipped or rotated: the
source's Patient Orientation holds for it, and Laterality and Body Part Examined are the
source's. When the source has no Patient Orientation the overlay's is empty (unknown).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from xrwatch.dicom.sr import (
    MANUFACTURER,
    SC_SERIES_NUMBER,
    copy_patient_study,
    evidence,
    set_character_set,
    software_versions,
)
from xrwatch.dicom.uids import Kind, derived_uid

logger = logging.getLogger(__name__)

BANNER = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
SC_SERIES_DESCRIPTION = "xrwatch AI heatmap (model input, research use only)"
_ORIENTATION = frozenset("LRAPHFCDV")  # PS3.3 C.7.6.1.1.1 letters (biped and quadruped)


def sc_uids(study_uid: str, source_sop_uid: str, model_sha256: str) -> tuple[str, str]:
    """``(series UID, SOP instance UID)`` of the overlay: one series per study and model."""
    return (
        derived_uid(Kind.SC_SERIES, study_uid, model_sha256),
        derived_uid(Kind.SC_INSTANCE, source_sop_uid, model_sha256),
    )


def with_banner(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` (RGB) with :data:`BANNER` burned in above them, white on dark red, on
    two lines when one does not fit the width, twice as large when that fits."""
    width = pixels.shape[1]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [BANNER]
    if draw.textlength(BANNER) + 4 > width:
        lines = BANNER.split(" - ")
    scale = 2 if max(draw.textlength(t) for t in lines) * 2 + 8 <= width else 1
    strip = Image.new("RGB", (width // scale, 12 * len(lines) + 2), (128, 0, 0))
    pen = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        x = max((strip.width - pen.textlength(line)) / 2, 0)
        pen.text((x, 1 + 12 * i), line, fill=(255, 255, 255))
    if scale > 1:
        strip = strip.resize((width, strip.height * scale), Image.Resampling.NEAREST)
    elif strip.width != width:
        strip = strip.crop((0, 0, width, strip.height))
    return np.concatenate([np.asarray(strip, dtype=np.uint8), pixels])


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two valid values, else ``None``."""
    value = source.get("PatientOrientation")
    values = [str(v).strip().upper() for v in (value or ())] if not isinstance(value, str) else []
    if len(values) == 2 and all(v and set(v) <= _ORIENTATION for v in values):
        return values[0], values[1]
    return None


def build_sc(
    source: Dataset, heatmap_png: Path, model_sha256: str, *, instance_number: int = 1
) -> hd.sc.SCImage:
    """A Secondary Capture (RGB, 8 bit) of the overlay PNG, in the source's study."""
    with Image.open(heatmap_png) as img:
        pixels = with_banner(np.asarray(img.convert("RGB"), dtype=np.uint8))
    series_uid, sop_uid = sc_uids(
        str(source.StudyInstanceUID), str(source.SOPInstanceUID), model_sha256
    )
    orientation = patient_orientation(source)
    laterality = str(source.get("Laterality") or source.get("ImageLaterality") or "").upper()
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence(source),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # highdicom needs a value; replaced below by the source's, or empty (unknown)
        patient_orientation=orientation or ("L", "F"),
        laterality=laterality if laterality in ("L", "R") else None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.PatientOrientation = list(orientation) if orientation else None  # type: ignore[assignment]
    if "Laterality" not in sc and not source.get("BodyPartExamined"):
        sc.Laterality = None  # type: ignore[assignment]  # Type 2C: empty = unknown (absent for a known unpaired part)
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"  # the banner and the legend: label and probability
    sc.SoftwareVersions = software_versions()
    sc.ManufacturerModelName = "xrwatch"
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = "xrwatch"
    sc.SecondaryCaptureDeviceSoftwareVersions = software_versions()
    sc.ConversionType = "WSD"  # workstation: drawn by software, not digitised
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = copy.deepcopy(source.BodyPartExamined)
    ref = Dataset()  # the source this was derived from
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    copy_patient_study(source, sc)
    set_character_set(sc, source)
    return sc
