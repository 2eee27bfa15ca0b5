"""The one set of field names for what xrwatch reports about a file.

``classify`` (CSV and JSON), the daemon's ``predictions.csv`` and ``json/`` files and
``inspect --json`` report overlapping facts; each fact has one name everywhere, defined
here. Facts about the image are named as :class:`~xrwatch.imageio.types.ImageMeta` names
them (snake_case, DICOM identifiers included). A test checks that every output uses only
these names.
"""

from __future__ import annotations

import dataclasses

from xrwatch.imageio.types import ImageMeta

FILE = "file"  # the input, as given (classify, inspect) or relative to INCOMING (daemon)
STATUS = "status"  # "ok" or "error"
ERROR = "error"  # why the file failed; empty when ok
ERROR_TYPE = "error_type"  # the xrwatch.errors class behind ``error``
SHA256 = "sha256"  # of the input file's bytes
LABEL = "label"
CONFIDENCE = "confidence"  # probability of ``label``
PROBABILITIES = "probabilities"  # JSON: {class: p}
PROB_PREFIX = "prob_"  # CSV: one prob_<class> column per class
MODEL = "model"  # which model: <arch>-<experiment>-<precision> (<file name>)
MODEL_SHA256 = "model_sha256"
PROVIDER = "provider"  # ONNX Runtime execution provider that ran the model
PROCESSED_AT = "processed_at"  # daemon: when the result was written (UTC, ISO 8601)
DETECTED_AT = "detected_at"  # daemon: when the file was first seen

# DICOM identifiers the reports carry to link a result to its study (never patient names,
# IDs or birth dates).
DICOM_IDS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "accession_number")

# How far to trust an ok result, and where the model looked (xrwatch.flags, xrwatch.heatmap).
FLAG = "flag"  # "", "low_confidence" or "out_of_scope"; a flagged result stays ok
FLAG_REASON = "flag_reason"  # why it was flagged; empty when not
OOD_SCORE = "ood_score"  # the scope guard's score (> 1 = out of scope); empty without a guard
HEATMAP = "heatmap"  # the overlay PNG's path (daemon: relative to REPORTS); empty when none
EXPLANATION = (FLAG, FLAG_REASON, OOD_SCORE, HEATMAP)

# What a prediction says, in classify's and the daemon's outputs alike. The flag sits next
# to the label it qualifies (a reader of the CSV sees them together), its reason after the
# confidence.
PREDICTION = (
    FILE, STATUS, LABEL, FLAG, CONFIDENCE, FLAG_REASON, ERROR, SHA256, MODEL_SHA256,
    *DICOM_IDS, OOD_SCORE, HEATMAP,
)  # fmt: skip

# Every fact about the image itself (inspect shows them all; the daemon a few).
IMAGE = tuple(f.name for f in dataclasses.fields(ImageMeta) if f.name != "path")

# What only inspect reports: how the decode went.
INSPECTION = ("transfer_syntax_name", "decode_ms", "min", "max", "mean", "preview")

ALL = frozenset(
    (
        *PREDICTION, MODEL, ERROR_TYPE, PROBABILITIES, PROVIDER, PROCESSED_AT, DETECTED_AT,
        *IMAGE, *INSPECTION,
    )
)  # fmt: skip


def prob_column(class_name: str) -> str:
    """The CSV column of one class's probability."""
    return PROB_PREFIX + class_name
