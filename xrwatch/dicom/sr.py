"""The classification of one DICOM image as a TID 1500 Measurement Report (highdicom).

The SR is a Comprehensive 3D SR whose content is DICOM's Imaging Measurement Report
(TID 1500), the template viewers such as OHIF display:

- a device observer (xrwatch, Manufacturer ``xrwatch``) and the procedure reported
  (SCT 399208008 Plain chest X-ray);
- an image library entry (TID 1600) of the source instance;
- for an input the model judged, one measurement group (TID 1501) per class of the model:
  Finding = the class's code (:mod:`xrwatch.dicom.codes`), Probability (DCM 122157) of
  it, the source image, and TID 4019 algorithm identification (model name, version,
  weights sha256); the predicted class's group comes first;
- for an input out of scope (not a frontal chest radiograph, by the model's scope guard or
  the header) or one that could not be read: no finding and no probability, but one group
  whose Summary of Analyses (DCM 111065) is Not Attempted (DCM 111225), with the reason;
- the research-use disclaimer and any flag as TEXT content (DCM 121106 Comment).

It joins its source's study: every patient and study attribute is copied from the source
(never invented or altered). Its UIDs derive from the source and the model
(:mod:`xrwatch.dicom.uids`): one SR series per study and model, one SR per source instance
and model, the same each time it is built.
"""

from __future__ import annotations

import copy
import functools
import io
import logging
import warnings
from typing import Any

import highdicom as hd
import pydicom.config
from pydicom import DataElement, Dataset
from pydicom.valuerep import PersonName, validate_value

import xrwatch
from xrwatch.dicom import codes
from xrwatch.dicom.uids import Kind, derived_uid

logger = logging.getLogger(__name__)


def _memoize_iod_lookups() -> None:
    """Answer highdicom's "is attribute X in the IOD of SOP class Y" from a cache.

    highdicom walks its tables of the standard on every call (a few ms each, several per
    SR and SC: Content Date and Time, multi-frame, has pixel data); the answer depends
    only on its arguments and those fixed tables, so the cached answer is the same.
    Left as it is when highdicom no longer has the function where it had it."""
    import highdicom._standard_utils as standard
    import highdicom.base
    import highdicom.sr.content

    original = getattr(standard, "is_attribute_in_iod", None)
    if original is None or hasattr(original, "xrwatch_cached"):
        return
    cached = functools.lru_cache(maxsize=512)(
        lambda attribute, sop_class_uid, exclude: original(attribute, sop_class_uid, exclude)
    )

    def is_attribute_in_iod(
        attribute: str, sop_class_uid: str, exclude_path_elements: Any = None
    ) -> bool:
        exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
        return bool(cached(str(attribute), str(sop_class_uid), exclude))

    is_attribute_in_iod.xrwatch_cached = True  # type: ignore[attr-defined]
    for module in (standard, highdicom.base, highdicom.sr.content):
        if getattr(module, "is_attribute_in_iod", None) is original:
            module.is_attribute_in_iod = is_attribute_in_iod  # type: ignore[attr-defined]


_memoize_iod_lookups()

MANUFACTURER = "xrwatch"  # what xrwatch.dicom.provenance recognises
SR_SERIES_NUMBER = 9901  # high, so viewers list the results after the images
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "xrwatch AI result (research use only)"
DISCLAIMER = "Research use only. Not a medical device; not for diagnosis."
NOT_JUDGED = ("out_of_scope", "out_of_population")  # flags (xrwatch.flags) with no finding


def software_versions() -> str:
    return f"xrwatch {xrwatch.__version__}"


def sr_uids(study_uid: str, source_sop_uid: str, model_sha256: str) -> tuple[str, str]:
    """``(series UID, SOP instance UID)``: one series per study and model, one SR per
    source instance and model."""
    return (
        derived_uid(Kind.SR_SERIES, study_uid, model_sha256),
        derived_uid(Kind.SR_INSTANCE, source_sop_uid, model_sha256),
    )


def not_attempted_reason(record: dict[str, Any], source: Dataset | None = None) -> str | None:
    """Why the model's output must not be reported as a finding (``None``: it may): an
    input that could not be read, one out of scope or out of population (the record's
    flag), or raw detector data (DX Presentation Intent Type FOR PROCESSING)."""
    if record.get("status") != "ok":
        return f"not analysed: {record.get('error') or 'the image could not be read'}"
    if record.get("flag") in NOT_JUDGED:
        why = (
            record.get("flag_reason") or "not a frontal chest radiograph of the trained population"
        )
        return f"{str(record['flag']).replace('_', ' ')}: {why}"
    intent = str(source.get("PresentationIntentType", "") if source is not None else "")
    if intent.strip().upper() == "FOR PROCESSING":
        return "out of scope: DICOM Presentation Intent Type FOR PROCESSING (raw detector data)"
    return None


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

# The General Study module's attributes (the Patient module is group 0010).
_STUDY = frozenset(
    ("StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
     "StudyDescription", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy")
)  # fmt: skip

_TEXT_VRS = frozenset({"AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"})

# Patient and study attributes copied from the source beyond those highdicom copies.
COPIED = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyDescription",
    "PatientComments",
)


def evidence(source: Dataset) -> Dataset:
    """A shallow copy of ``source`` with the Type 2 attributes present (empty if absent)."""
    source.decode()  # every text value read with the source's own character set, now
    ds = copy.deepcopy(source)  # the source is not changed (a header: small)
    ds.SpecificCharacterSet = "ISO_IR 192"  # what highdicom builds in; see set_character_set
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def source_character_set(source: Dataset) -> str | list[str] | None:
    """``source``'s Specific Character Set as written (``None``: it names none)."""
    value = source.get("SpecificCharacterSet")
    if value is None:
        return None
    values = [value.strip()] if isinstance(value, str) else [str(v or "").strip() for v in value]
    if not any(values):
        return None
    return values[0] if len(values) == 1 else values


def _is_ascii(value: Any) -> bool:
    if isinstance(value, str | PersonName):
        return str(value).isascii()
    if isinstance(value, list | tuple):  # MultiValue is a list
        return all(_is_ascii(v) for v in value)
    return True  # numbers, bytes, sequences (walked by _non_ascii)


def _non_ascii(ds: Dataset, out: list[DataElement]) -> bool:
    """Collect into ``out`` every element of ``ds`` (sequences walked) with a text value
    that is not ASCII; ``False`` when a nested item names its own character set."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or ():
                if "SpecificCharacterSet" in item or not _non_ascii(item, out):
                    return False
        elif not _is_ascii(element.value):
            out.append(element)
    return True


def _encodes(ds: Dataset) -> bool:
    """Whether every text of ``ds`` encodes in its Specific Character Set.

    ASCII encodes in every character set pydicom knows (its codecs all take the
    printable ASCII: ``tests/xrwatch/dicom/test_sr_charset_check.py``), so only the
    elements with other characters are written, each in an item of a sequence that
    inherits the character set, by pydicom's own writer; the Specific Character Set
    itself is always written (pydicom warns there about a name it does not know)."""
    texts: list[DataElement] = []
    if _non_ascii(ds, texts):
        probe = Dataset()
        if "SpecificCharacterSet" in ds:
            probe.SpecificCharacterSet = ds.SpecificCharacterSet
        items = []
        for element in texts:
            item = Dataset()
            item[element.tag] = element
            items.append(item)
        probe.ContentSequence = items
        syntax: dict[str, Any] = {"implicit_vr": False, "little_endian": True}
    else:
        probe, syntax = ds, {}  # a nested character set: write all, as it will be written
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns, then writes '?', when one does not
        try:
            probe.save_as(io.BytesIO(), enforce_file_format=False, **syntax)
        except (UnicodeError, LookupError, UserWarning):
            return False
    return True


def set_character_set(ds: Dataset, source: Dataset) -> None:
    """Give ``ds`` (built by highdicom in UTF-8, its text already decoded) the source's
    Specific Character Set, so a PACS reads both alike (``ISO_IR 100``,
    ``\\ISO 2022 IR 87``, ``\\ISO 2022 IR 149``, none ...); UTF-8 (``ISO_IR 192``) when
    something cannot be written in it."""
    for candidate in (source_character_set(source), "ISO_IR 192"):
        if candidate is None:
            if "SpecificCharacterSet" in ds:
                del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = candidate
        if _encodes(ds):
            return
    raise ValueError("the SR's text cannot be encoded even in UTF-8")


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the patient and study attributes highdicom leaves out (Issuer of Patient ID
    ...); then, of every value taken from the source, keep only those valid for their VR
    (a PatientAge ``81`` is no Age String): a Type 2 one is emptied, another left out."""
    for keyword in COPIED:
        if keyword in source and keyword not in target:
            target[keyword] = copy.deepcopy(source[keyword])
    for element in list(target):
        keyword = element.keyword
        if element.VR not in _TEXT_VRS or not (element.tag.group == 0x0010 or keyword in _STUDY):
            continue
        if element.tag not in source or source[element.tag].value != element.value:
            continue  # not taken from the source
        try:
            validate_value(element.VR, element.value, pydicom.config.RAISE)
        except ValueError:
            logger.debug("source %s is invalid for its VR; not copied", keyword)
            if keyword in _TYPE2:
                target[element.tag].value = None
            else:
                del target[element.tag]


class _Descriptors(hd.sr.ImageLibraryEntryDescriptors):
    """TID 1602 descriptors that leave out the projection radiography ones (TID 1603:
    patient orientation, imager pixel spacing) when the source does not carry them,
    rather than failing (highdicom reads them unconditionally for CR and DX)."""

    def _is_projection_radiography(self, ds: Dataset) -> bool:
        return (
            super()._is_projection_radiography(ds)
            and len(ds.get("PatientOrientation") or ()) == 2
            and len(ds.get("ImagerPixelSpacing") or ()) == 2
        )


def image_library(source: Dataset) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library with one entry, the source (as highdicom's ImageLibrary
    builds it, with :class:`_Descriptors`)."""
    entry = hd.sr.ImageContentItem(
        name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    entry.ContentSequence = hd.sr.ContentSequence(list(_Descriptors(source)))  # type: ignore[arg-type]
    group = hd.sr.ContainerContentItem(
        name=codes.IMAGE_LIBRARY_GROUP, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence([entry])
    library = hd.sr.ContainerContentItem(
        name=codes.IMAGE_LIBRARY, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _algorithm(model_name: str, model_sha256: str) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model_name[:64] or "xrwatch model",
        version=software_versions(),
        parameters=[f"weights sha256 {model_sha256 or 'unknown'}"],
        manufacturer=MANUFACTURER,
    )


def _tracking(sop_uid: str, what: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=derived_uid(Kind.TRACKING, sop_uid, what), identifier=what[:64]
    )


def _groups(
    source: Dataset, record: dict[str, Any], model_name: str, sop_uid: str
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    algorithm = _algorithm(model_name, str(record.get("model_sha256") or ""))
    image = [hd.sr.SourceImageForMeasurementGroup.from_source_image(source)]
    reason = not_attempted_reason(record, source)
    if reason is not None:
        return [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(sop_uid, "xrwatch analysis"),
                algorithm_id=algorithm,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(codes.SUMMARY_OF_ANALYSES, codes.NOT_ATTEMPTED)
                ],
                source_images=image,
            )
        ]
    probs: dict[str, float] = dict(record.get("probabilities") or {})
    label = str(record.get("label"))
    order = sorted(probs, key=lambda c: (c != label, -float(probs[c])))
    groups = []
    for cls in order:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(sop_uid, f"xrwatch {cls}"),
                finding_type=codes.class_code(cls),
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.PROBABILITY,
                        value=round(float(probs[cls]), 6),
                        unit=codes.NO_UNITS,
                        algorithm_id=algorithm,
                    )
                ],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(codes.SUMMARY_OF_ANALYSES, codes.SUCCEEDED)
                ],
                source_images=image,
            )
        )
    return groups


def _comments(record: dict[str, Any], source: Dataset) -> list[str]:
    out = [DISCLAIMER]
    reason = not_attempted_reason(record, source)
    if reason is not None:
        out.append(reason)
    elif record.get("flag"):
        out.append(f"flag {record['flag']}: {record.get('flag_reason') or ''}".strip())
    return out


def _document(
    source: Dataset, report: hd.sr.MeasurementReport, **kwargs: Any
) -> hd.sr.Comprehensive3DSR:
    """``hd.sr.Comprehensive3DSR(evidence=[source], content=report, **kwargs)``, built around
    the root container without its items, which are attached after.

    highdicom's constructor copies and re-parses the whole content tree (into the object's
    ``content`` attribute, which is not written) and searches it for the instances it
    references, only to check that each is in the evidence; the evidence sequences it writes
    come from the evidence alone. That took about 60 % of the time of an SR
    (``benchmarks/sr_build.py --profile``). Given the root without its items, it writes the
    same document (``benchmarks/sr_build.py --dump``: byte for byte); the one instance the
    items reference is ``source``, checked here."""
    root = report[0]
    referenced = {str(ref.ReferencedSOPInstanceUID) for ref in _references(root.ContentSequence)}
    if referenced - {str(source.SOPInstanceUID)}:
        raise ValueError(f"the SR content references instances not in its evidence: {referenced}")
    shell = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = []
    sr = hd.sr.Comprehensive3DSR(evidence=[source], content=shell, **kwargs)
    sr.ContentSequence = root.ContentSequence
    return sr


def _references(items: Any) -> Any:
    """Every Referenced SOP Sequence item under the content ``items``, recursively."""
    for item in items:
        yield from item.get("ReferencedSOPSequence") or ()
        if "ContentSequence" in item:
            yield from _references(item.ContentSequence)


def build_sr(
    source: Dataset, record: dict[str, Any], model_name: str, *, instance_number: int = 1
) -> hd.sr.Comprehensive3DSR:
    """The SR of ``record`` (a daemon report record) about ``source`` (its header)."""
    model_sha = str(record.get("model_sha256") or "")
    series_uid, sop_uid = sr_uids(
        str(source.StudyInstanceUID), str(source.SOPInstanceUID), model_sha
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(Kind.DEVICE, model_sha),
            name="xrwatch",
            manufacturer_name=MANUFACTURER,
            model_name=model_name[:64] or None,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.CHEST_XRAY,
        imaging_measurements=_groups(source, record, model_name, sop_uid),
    )
    root = report[0]
    # TID 1500 row 4: the image library comes before the imaging measurements (the last item)
    root.ContentSequence.insert(len(root.ContentSequence) - 1, image_library(source))
    for text in _comments(record, source):
        root.ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.COMMENT,
                value=text[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    sr = _document(
        evidence(source),
        report,
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
    )
    sr.SoftwareVersions = software_versions()
    sr.ManufacturerModelName = "xrwatch"
    copy_patient_study(source, sr)
    set_character_set(sr, source)
    return sr
