"""The SR and the heatmap SC checked by the real tools: dicom3tools' ``dciodvfy`` (0 errors,
0 warnings, for every character set a source may use) and highdicom, which must read the
SR back as a TID 1500 measurement report. No network."""

from __future__ import annotations

import io
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.sr.codedict import codes

from tests.helpers.tools import require_tool
from xrwatch.dicom import codes as xcodes
from xrwatch.dicom.sc import build_sc
from xrwatch.dicom.sr import build_sr, sr_uids
from xrwatch.dicom.uids import UID_ROOT, is_valid_uid, is_xrwatch_uid

# (Specific Character Set, a patient name in it): Latin-1, Japanese and Korean with code
# extensions (the default repertoire first, written as an empty value), and none (ASCII).
CHARSETS = {
    "ISO_IR 100": ("ISO_IR 100", "Buc^Jérôme"),
    "ISO 2022 IR 87": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    "ISO 2022 IR 149": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    "empty": (None, "Doe^John"),
}
PROBS = {"Normal": 0.1, "Bacteria": 0.7, "Virus": 0.15, "COVID-19": 0.05}
SHA = "ab" * 32


@pytest.fixture(scope="module")
def dciodvfy() -> str:
    return require_tool("dciodvfy", "dicom3tools")


def _source(real_dicoms: list[Path], charset: str) -> pydicom.Dataset:
    """The real CR chest (CR-MONO1-10-chest) as a modality would send it: complete Type 2
    study attributes, Issuer of Patient ID, in ``charset``; written and read back, so
    its text is decoded from bytes in that character set."""
    ds = pydicom.dcmread(real_dicoms[0], force=True, stop_before_pixels=True)
    value, name = CHARSETS[charset]
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = "P123", "HOSPITAL-A", name
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "101010", "S1"
    if value is None:
        ds.pop("SpecificCharacterSet", None)
    else:
        ds.SpecificCharacterSet = value
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    buf.seek(0)
    return pydicom.dcmread(buf, force=True)


def _record(**changes: object) -> dict:
    return {"status": "ok", "label": "Bacteria", "probabilities": PROBS, "model_sha256": SHA,
            "flag": "", **changes}  # fmt: skip


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _verify(dciodvfy: str, path: Path) -> str:
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    report = out.stdout + out.stderr
    problems = [ln for ln in report.splitlines() if ln.startswith(("Error", "Warning"))]
    assert problems == [], f"{path.name}:\n{report}"
    return report


@pytest.mark.parametrize("charset", list(CHARSETS))
def test_sr_and_sc_pass_dciodvfy_in_every_character_set(
    charset: str, real_dicoms: list[Path], tmp_path: Path, dciodvfy: str
) -> None:
    source = _source(real_dicoms, charset)
    png = tmp_path / "heat.png"
    Image.fromarray(np.full((242, 224, 3), 90, np.uint8)).save(png)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = build_sr(source, _record(), "default.onnx (resnet50-PRCE-int8)", instance_number=7)
        sc = build_sc(source, png, SHA, instance_number=7)
    for ds, name in ((sr, "sr.dcm"), (sc, "sc.dcm")):
        path = _write(ds, tmp_path / name)
        assert "Comprehensive3DSR" in _verify(dciodvfy, path) or name == "sc.dcm"
        back = pydicom.dcmread(path)
        assert back.get("SpecificCharacterSet") == CHARSETS[charset][0] or (
            CHARSETS[charset][0] is None and "SpecificCharacterSet" not in back
        )
        assert str(back.PatientName) == CHARSETS[charset][1]  # round trip, not mangled
        assert back.IssuerOfPatientID == "HOSPITAL-A" and back.PatientID == "P123"
        assert back.StudyInstanceUID == source.StudyInstanceUID
        assert back.AccessionNumber == source.AccessionNumber
        # marked as xrwatch's own (what xrwatch.dicom.provenance recognises)
        assert back.Manufacturer == "xrwatch" and back.SoftwareVersions.startswith("xrwatch ")
        assert is_xrwatch_uid(back.SOPInstanceUID) and is_valid_uid(back.SOPInstanceUID)
        assert back.SeriesInstanceUID.startswith(UID_ROOT + ".")
    assert sc.ImageType == ["DERIVED", "SECONDARY"]
    assert sc.BodyPartExamined == "CHEST" and "Laterality" not in sc  # an unpaired part
    assert sr.SeriesNumber != sc.SeriesNumber


def test_highdicom_reads_the_sr_back_as_a_tid_1500_measurement_report(
    real_dicoms: list[Path], tmp_path: Path
) -> None:
    source = _source(real_dicoms, "ISO_IR 100")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = _write(build_sr(source, _record(), "m.onnx"), tmp_path / "sr.dcm")
        sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(PROBS)
    findings = {}
    for group in groups:
        assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
        algo = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group[0].ContentSequence}
        assert algo["111001"].TextValue == "m.onnx"  # TID 4019 Algorithm Name
        assert algo["111003"].TextValue.startswith("xrwatch ")  # Algorithm Version
        assert algo["111002"].TextValue == f"weights sha256 {SHA}"  # Algorithm Parameters
        (measurement,) = group.get_measurements(name=codes.DCM.Probability)
        findings[group.finding_type.value] = measurement.value
    assert findings == {"111286": 0.1, "53084003": 0.7, "75570004": 0.15, "840539006": 0.05}
    assert groups[0].finding_type == xcodes.BACTERIAL_PNEUMONIA  # the predicted class first
    root = sr.ContentSequence
    procedure = [i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "399208008"
    library = [i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    entry = library[0].ContentSequence[0].ContentSequence[0]
    assert entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    observer = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in root}
    assert observer["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    texts = [i.TextValue for i in root if i.ValueType == "TEXT"]
    assert any("Research use only" in t for t in texts)


@pytest.mark.parametrize(
    "changes",
    [
        {"flag": "out_of_scope", "flag_reason": "DICOM ViewPosition LL (PA/AP expected)"},
        {"flag": "out_of_population", "flag_reason": "DICOM patient age 40 y >= 18 y"},
        {
            "status": "error",
            "error": "cannot decode the pixel data",
            "label": None,
            "probabilities": {},
        },
        {"PresentationIntentType": "FOR PROCESSING"},  # DX raw detector data
    ],
    ids=["out_of_scope", "out_of_population", "unreadable", "dx_for_processing"],
)
def test_an_input_not_judged_gets_no_finding_but_a_coded_not_attempted_with_the_reason(
    changes: dict[str, object], real_dicoms: list[Path], tmp_path: Path, dciodvfy: str
) -> None:
    source, changes = _source(real_dicoms, "empty"), dict(changes)
    if "PresentationIntentType" in changes:  # a header fact, not the record's
        source.PresentationIntentType = changes.pop("PresentationIntentType")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = _write(build_sr(source, _record(**changes), "m.onnx"), tmp_path / "sr.dcm")
        sr = hd.sr.srread(path)
    _verify(dciodvfy, path)
    (group,) = hd.sr.MeasurementReport.from_sequence([sr]).get_image_measurement_groups()
    assert group.finding_type is None and group.get_measurements() == []
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name == xcodes.SUMMARY_OF_ANALYSES
    assert evaluation.value == xcodes.NOT_ATTEMPTED
    texts = [i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT"]
    reason = changes.get("flag_reason") or changes.get("error") or "FOR PROCESSING"
    assert any(str(reason) in t for t in texts)
    assert "Bacterial" not in str(sr.ContentSequence)  # no coded diagnosis anywhere


def test_every_dcm_code_is_the_standards_and_uids_are_stable(real_dicoms: list[Path]) -> None:
    for code in (xcodes.FINDING, xcodes.PROBABILITY, xcodes.NO_ABNORMALITY,
                 xcodes.SUMMARY_OF_ANALYSES, xcodes.SUCCEEDED, xcodes.NOT_ATTEMPTED,
                 xcodes.COMMENT, xcodes.DEVICE, xcodes.IMAGE_LIBRARY,
                 xcodes.IMAGE_LIBRARY_GROUP):  # fmt: skip
        matches = [c for c in codes.DCM.dir() if getattr(codes.DCM, c).value == code.value]
        assert matches, code
        assert getattr(codes.DCM, matches[0]).meaning.lower() == code.meaning.lower()
    assert xcodes.class_code("Pneumothorax").scheme_designator == "99XRW"  # no standard code
    a = sr_uids("1.2.3", "1.2.3.4", SHA)
    assert a == sr_uids("1.2.3", "1.2.3.4", SHA)  # rebuilt after a crash: the same SR
    b = sr_uids("1.2.3", "1.2.3.5", SHA)
    assert a[0] == b[0] and a[1] != b[1]  # one series per study and model
    assert sr_uids("1.2.3", "1.2.3.4", "cd" * 32)[0] != a[0]  # another model: another series
    assert all(len(u) <= 64 and is_valid_uid(u) for u in (*a, *b))


def test_patient_attributes_are_copied_only_when_valid(real_dicoms: list[Path]) -> None:
    source = _source(real_dicoms, "ISO_IR 100")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid age it is given
        source.PatientAge, source.PatientWeight, source.StudyDescription = "81", "70.5", "THORAX"
        sr = build_sr(source, _record(), "m.onnx")
    assert "PatientAge" not in sr  # "81" is no Age String (nnnY): left out, not copied
    assert sr.PatientWeight == 70.5 and sr.StudyDescription == "THORAX"
    source.PatientAge = "081Y"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_sr(source, _record(), "m.onnx").PatientAge == "081Y"


def _fixed_bytes(ds: pydicom.Dataset) -> bytes:
    """``ds`` written with the creation date and time highdicom stamps set to one value."""
    for keyword in ("ContentDate", "InstanceCreationDate"):
        setattr(ds, keyword, "20260101")
    for keyword in ("ContentTime", "InstanceCreationTime"):
        setattr(ds, keyword, "120000")
    for item in ds.get("ContributingEquipmentSequence") or ():
        item.ContributionDateTime = "20260101120000"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO 2022 IR 87"])
@pytest.mark.parametrize("flag", ["", "out_of_scope"])
def test_the_sr_is_byte_for_byte_the_one_highdicom_builds_from_the_whole_tree(
    flag: str, charset: str, real_dicoms: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_sr hands highdicom's Comprehensive3DSR the root container without its items
    and attaches them after (about 60 % of an SR's time saved); the file must be the one
    the constructor writes when given the whole tree (a highdicom that derived more from
    the tree would fail here)."""
    from xrwatch.dicom import sr as sr_module

    source = _source(real_dicoms, charset)
    record = _record(flag=flag, flag_reason="a lateral view" if flag else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = _fixed_bytes(build_sr(source, record, "m.onnx"))
        monkeypatch.setattr(
            sr_module,
            "_document",
            lambda evidence, report, **kw: hd.sr.Comprehensive3DSR(
                evidence=[evidence], content=report, **kw
            ),
        )
        whole = _fixed_bytes(build_sr(source, record, "m.onnx"))
    assert fast == whole


def test_an_sr_that_references_another_instance_is_refused(real_dicoms: list[Path]) -> None:
    from xrwatch.dicom import sr as sr_module

    source = _source(real_dicoms, "empty")
    other = pydicom.Dataset()
    other.update(source)
    other.SOPInstanceUID = source.SOPInstanceUID + ".9"
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=xcodes.CHEST_XRAY,
        imaging_measurements=[
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(identifier="t"),
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(other)],
            )
        ],
    )
    with pytest.raises(ValueError, match="not in its evidence"):
        sr_module._document(
            sr_module.evidence(source),
            report,
            series_instance_uid="1.2.3",
            series_number=1,
            sop_instance_uid="1.2.3.4",
            instance_number=1,
        )
