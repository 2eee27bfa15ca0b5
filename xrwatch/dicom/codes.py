"""The coded concepts of xrwatch's DICOM results, each checked against its source.

DCM codes are from DICOM PS3.16 (checked against ``pydicom.sr.codedict.codes``, which is
generated from it; ``tests/xrwatch/dicom/test_sr_codes.py`` compares every one). SNOMED CT
codes (``SCT``) were checked against the SNOMED CT browser's fully specified names:

- 53084003  Bacterial pneumonia (disorder)
- 75570004  Viral pneumonia (disorder)
- 840539006 Disease caused by severe acute respiratory syndrome coronavirus 2 (disorder),
  preferred term "COVID-19"
- 399208008 Plain X-ray of chest (procedure), preferred term "Plain chest X-ray"

A class of a model that has no standard code gets a local code (scheme ``99XRW``, the
PS3.16 convention for private schemes) so that the SR still carries its probability.
"""

from __future__ import annotations

import hashlib

import highdicom as hd

LOCAL_SCHEME = "99XRW"  # PS3.16 8.2: a designator starting with 99 is local

# -- DCM (PS3.16 Annex D) ---------------------------------------------------------------
FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
NO_ABNORMALITY = hd.sr.CodedConcept("111286", "DCM", "No abnormality")
SUMMARY_OF_ANALYSES = hd.sr.CodedConcept("111065", "DCM", "Summary of Analyses")
SUCCEEDED = hd.sr.CodedConcept("111222", "DCM", "Succeeded")  # CID 6042 Status of Results
NOT_ATTEMPTED = hd.sr.CodedConcept("111225", "DCM", "Not Attempted")  # CID 6042
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
DEVICE = hd.sr.CodedConcept("121007", "DCM", "Device")
IMAGE_LIBRARY = hd.sr.CodedConcept("111028", "DCM", "Image Library")
IMAGE_LIBRARY_GROUP = hd.sr.CodedConcept("126200", "DCM", "Image Library Group")

# -- UCUM ----------------------------------------------------------------------------------
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")  # a probability in [0, 1]

# -- SNOMED CT -----------------------------------------------------------------------------
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
BACTERIAL_PNEUMONIA = hd.sr.CodedConcept("53084003", "SCT", "Bacterial pneumonia")
VIRAL_PNEUMONIA = hd.sr.CodedConcept("75570004", "SCT", "Viral pneumonia")
COVID_19 = hd.sr.CodedConcept("840539006", "SCT", "COVID-19")

# The classes of xrwatch's models (training.labels.TASK_CLASSES) and what each means.
CLASS_CODES: dict[str, hd.sr.CodedConcept] = {
    "Normal": NO_ABNORMALITY,
    "Bacteria": BACTERIAL_PNEUMONIA,
    "Virus": VIRAL_PNEUMONIA,
    "COVID-19": COVID_19,
}


def class_code(name: str) -> hd.sr.CodedConcept:
    """The code of a model class: standard when known, else a local ``99XRW`` code."""
    known = CLASS_CODES.get(name)
    if known is not None:
        return known
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    meaning = "".join(c for c in name if c.isprintable() and c != "\\")[:64]
    return hd.sr.CodedConcept(f"C-{digest}", LOCAL_SCHEME, meaning or "unnamed class")


def is_local(code: hd.sr.CodedConcept) -> bool:
    return str(code.scheme_designator) == LOCAL_SCHEME
