"""The classification of one DICOM image as a DICOM Comprehensive SR (built with highdicom).

The SR joins its source's study: patient and study attributes are copied from the source
by highdicom (never invented or altered), and it references the source study, series and
instance (Current Requested Procedure Evidence, and an IMAGE item in the content tree).
Its own UIDs are new, but derived from (source SOP Instance UID, model sha256): the SR of
one classification always has the same UIDs, so building it again after a crash, or
sending it again after an unacknowledged C-STORE, never makes a second SR in the PACS.

Codes are local to xrwatch (coding scheme ``99XRW``, the DICOM convention for private
schemes): a classifier's classes have no standard codes.
"""

from __future__ import annotations

import copy
import logging
import uuid
from typing import Any

import highdicom as hd
from pydicom import Dataset

import xrwatch

logger = logging.getLogger(__name__)

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "xrwatch:dicom-results")
SCHEME = "99XRW"  # private coding scheme designator (DICOM PS3.16: 99 prefix = local)
SERIES_NUMBER = 9901  # SR series number: high, so viewers list it after the images
MANUFACTURER = "xrwatch (research use only, not a medical device)"

RESULT = hd.sr.CodedConcept("XRW-RESULT", SCHEME, "Chest X-ray AI classification")
PREDICTED = hd.sr.CodedConcept("XRW-CLASS", SCHEME, "Predicted class")
SOURCE = hd.sr.CodedConcept("XRW-SOURCE", SCHEME, "Source image")
MODEL = hd.sr.CodedConcept("XRW-MODEL", SCHEME, "Model name")
MODEL_SHA = hd.sr.CodedConcept("XRW-MODEL-SHA256", SCHEME, "Model sha256")
MODEL_VERSION = hd.sr.CodedConcept("XRW-VERSION", SCHEME, "xrwatch version")
FLAG = hd.sr.CodedConcept("XRW-FLAG", SCHEME, "Flag")
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")


def probability_code(cls: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(f"XRW-P-{cls}"[:16], SCHEME, f"Probability of {cls}")


def class_code(cls: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(f"XRW-C-{cls}"[:16], SCHEME, cls)


def derived_uid(*parts: str) -> str:
    """A ``2.25.`` UID from a name-based UUID (version 5, ISO/IEC 9834-8) of ``parts``:
    unique to them, and the same each time they are the same."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def sr_uids(source_sop_uid: str, model_sha256: str) -> tuple[str, str]:
    """``(series UID, SOP instance UID)`` of the SR for this source and model."""
    return (
        derived_uid("sr-series", source_sop_uid, model_sha256),
        derived_uid("sr", source_sop_uid, model_sha256),
    )


# Type 2 attributes (present, possibly empty) that highdicom copies into the SR; a source
# that omits one gets it empty in the copy handed to highdicom: nothing is made up.
_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def evidence(source: Dataset) -> Dataset:
    ds = copy.copy(source)  # shallow: the source is not changed
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def build_sr(source: Dataset, record: dict[str, Any], model_name: str) -> hd.sr.ComprehensiveSR:
    """The SR of ``record`` (a daemon report record with status ok) about ``source``."""
    probs: dict[str, float] = record.get("probabilities") or {}
    model_sha = str(record.get("model_sha256") or "")
    items: list[hd.sr.ContentItem] = [
        hd.sr.ImageContentItem(
            name=SOURCE,
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        hd.sr.CodeContentItem(
            name=PREDICTED,
            value=class_code(str(record["label"])),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ]
    for cls, p in probs.items():
        items.append(
            hd.sr.NumContentItem(
                name=probability_code(cls),
                value=round(float(p), 6),
                unit=UNITLESS,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    if record.get("flag"):  # e.g. low confidence, out of distribution
        text = str(record["flag"])
        if record.get("flag_reason"):
            text += f": {record['flag_reason']}"
        items.append(
            hd.sr.TextContentItem(
                name=FLAG, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    for name, value in (
        (MODEL, model_name),
        (MODEL_SHA, model_sha),
        (MODEL_VERSION, xrwatch.__version__),
    ):
        items.append(
            hd.sr.TextContentItem(
                name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    root = hd.sr.ContainerContentItem(name=RESULT, template_id=None)
    root.ContentSequence = hd.sr.ContentSequence(items)
    series_uid, sop_uid = sr_uids(str(source.SOPInstanceUID), model_sha)
    return hd.sr.ComprehensiveSR(
        evidence=[evidence(source)],
        content=root,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="xrwatch AI result",
    )
