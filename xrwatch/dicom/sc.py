"""The heatmap overlay of one result as a DICOM Secondary Capture (built with highdicom).

Made only when the result has a heatmap (``record["heatmap"]``: a PNG under REPORTS,
written by the daemon for models with a ``cam`` output). Like the SR, it joins the
source's study (patient and study attributes copied by highdicom), gets its own series,
and its UIDs derive from (source SOP Instance UID, model sha256), so writing or sending it
again never makes a second instance. The overlay shows the model's input, not the original
image: a viewer must not take it for the radiograph.
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from xrwatch.dicom.sr import MANUFACTURER, derived_uid, evidence

logger = logging.getLogger(__name__)

SERIES_NUMBER = 9902  # after the SR series (9901)


def sc_uids(source_sop_uid: str, model_sha256: str) -> tuple[str, str]:
    """``(series UID, SOP instance UID)`` of the overlay for this source and model."""
    return (
        derived_uid("sc-series", source_sop_uid, model_sha256),
        derived_uid("sc", source_sop_uid, model_sha256),
    )


def build_sc(source: Dataset, heatmap_png: Path, model_sha256: str) -> hd.sc.SCImage:
    """A Secondary Capture (RGB, 8 bit) of the overlay PNG, in the source's study."""
    with Image.open(heatmap_png) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    series_uid, sop_uid = sc_uids(str(source.SOPInstanceUID), model_sha256)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence(source),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # unknown for the model input; PS3.3 requires a value
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = "xrwatch AI heatmap (model input, not for diagnosis)"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"  # the legend: label and probability
    # The source this was derived from.
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc
