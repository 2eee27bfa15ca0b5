"""SR and heatmap-overlay SC built from the ledger's DICOM results (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from xrwatch.dicom.outbox import Outbox, on_finish
from xrwatch.dicom.sender import ResultsWorker
from xrwatch.dicom.settings import Destination
from xrwatch.dicom.sr import sr_uids
from xrwatch.serve.ledger import Ledger

PACS = Destination("PACS", "127.0.0.1", 104)


def _finish(ledger: Ledger, rel: str, record: dict, state: str = "ok") -> int:
    row_id = ledger.claim(rel, rel, "", 1, 1, 0.0)
    assert row_id is not None
    ledger.finish([(row_id, state, record)], [on_finish])
    return row_id


def test_sr_and_overlay_sc_are_written_once_and_queued_per_destination(
    tmp_path: Path, real_dicoms: list[Path]
) -> None:
    incoming, reports = tmp_path / "in", tmp_path / "rep"
    incoming.mkdir()
    ledger = Ledger(tmp_path / "state")
    outbox = Outbox(ledger.path)
    outbox.create()
    source_file = real_dicoms[0]
    shutil.copyfile(source_file, incoming / "a.dcm")
    shutil.copyfile(real_dicoms[1], incoming / "b.dcm")
    source = pydicom.dcmread(source_file, force=True)
    heat = reports / "heatmaps" / "a.dcm.png"
    heat.parent.mkdir(parents=True)
    Image.fromarray(np.full((146, 128, 3), 200, np.uint8)).save(heat)
    record = {
        "file": "a.dcm",
        "status": "ok",
        "kind": "dicom",
        "sop_instance_uid": str(source.SOPInstanceUID),
        "study_instance_uid": str(source.StudyInstanceUID),
        "label": "Normal",
        "probabilities": {"Normal": 0.9, "COVID-19": 0.1},
        "model_sha256": "ab" * 32,
        "flag": "review",
        "flag_reason": "low confidence",
        "heatmap": "heatmaps/a.dcm.png",
    }
    _finish(ledger, "a.dcm", record)
    other = pydicom.dcmread(real_dicoms[1], force=True, stop_before_pixels=True)
    failed = {**record, "file": "b.dcm", "status": "error", "error": "cannot decode"}
    failed.update(sop_instance_uid=str(other.SOPInstanceUID), label=None, probabilities={})
    failed.update(study_instance_uid=str(other.StudyInstanceUID), heatmap=None)
    _finish(ledger, "b.dcm", failed, "error")
    worker = ResultsWorker(
        outbox=outbox, incoming=incoming, reports=reports, model_name="m.onnx",
        ae_title="XRWATCH", destinations=[PACS],
    )  # fmt: skip
    assert worker.write_due() == 2  # the error outcome gets a "not attempted" SR
    assert worker.write_due() == 0  # and nothing is written twice
    not_done = pydicom.dcmread(
        reports / "dicom" / str(other.StudyInstanceUID) / f"{other.SOPInstanceUID}.SR.dcm"
    )
    assert "Probability" not in str(not_done.ContentSequence)  # no finding, no probability
    assert "Not Attempted" in str(not_done.ContentSequence)
    folder = reports / "dicom" / str(source.StudyInstanceUID)
    sr = pydicom.dcmread(folder / f"{source.SOPInstanceUID}.SR.dcm")
    sc = pydicom.dcmread(folder / f"{source.SOPInstanceUID}.SC.dcm")
    assert (
        sr.SOPInstanceUID == sr_uids(source.StudyInstanceUID, source.SOPInstanceUID, "ab" * 32)[1]
    )
    texts = [(i.ConceptNameCodeSequence[0].CodeMeaning, i.TextValue)
             for i in sr.ContentSequence if i.ValueType == "TEXT"]  # fmt: skip
    assert ("Comment", "flag review: low confidence") in texts
    assert ("Device Observer Model Name", "m.onnx") in texts
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, sr.SeriesInstanceUID)
    assert sc.pixel_array.shape == (172, 128, 3)  # the overlay under a 2-line banner
    assert (sc.pixel_array[146:] == 200).all()  # the overlay itself, unchanged
    assert sc.ImageType == ["DERIVED", "SECONDARY"] and sc.Manufacturer == "xrwatch"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert str(sc.get("PatientName") or "") == str(source.get("PatientName") or "")
    counts = outbox.destination_counts()[str(PACS)]
    assert counts["pending"] == 3 and counts["sent"] == 0  # a's SR and overlay, b's SR
    assert outbox.result_counts()["written"] == 2
    outbox.close()
    ledger.close()


def test_a_vanished_source_is_retried_with_back_off(tmp_path: Path, real_dicoms) -> None:
    ledger = Ledger(tmp_path / "state")
    outbox = Outbox(ledger.path)
    outbox.create()
    record = {"file": "gone.dcm", "kind": "dicom", "sop_instance_uid": "1.2.3", "label": "x"}
    _finish(ledger, "gone.dcm", record)
    worker = ResultsWorker(
        outbox=outbox, incoming=tmp_path, reports=tmp_path / "rep", model_name="m",
        ae_title="XRWATCH", destinations=[],
    )  # fmt: skip
    assert worker.write_due() == 1
    assert worker.write_due() == 0  # waiting for its back-off
    row = outbox._con().execute("SELECT attempts, last_error FROM dicom_results").fetchone()
    assert row[0] == 1 and "no longer in INCOMING" in row[1]
    outbox.close()
    ledger.close()


def test_the_sr_of_an_archived_input_is_built_from_the_archive(
    tmp_path: Path, real_dicoms: list[Path]
) -> None:
    ledger = Ledger(tmp_path / "state")
    outbox = Outbox(ledger.path)
    outbox.create()
    moved = tmp_path / "archive" / "processed" / "a.dcm"
    moved.parent.mkdir(parents=True)
    shutil.copyfile(real_dicoms[0], moved)  # no longer in INCOMING
    uid = str(pydicom.dcmread(moved, force=True, stop_before_pixels=True).SOPInstanceUID)
    record = {"file": "a.dcm", "kind": "dicom", "sop_instance_uid": uid, "label": "x"}
    ledger.set_archived(_finish(ledger, "a.dcm", record), str(moved))
    worker = ResultsWorker(
        outbox=outbox, incoming=tmp_path / "in", reports=tmp_path / "rep", model_name="m",
        ae_title="XRWATCH", destinations=[],
    )  # fmt: skip
    assert worker.write_due() == 1
    assert outbox.result_counts()["written"] == 1
    assert len(list((tmp_path / "rep" / "dicom").rglob("*.SR.dcm"))) == 1
    outbox.close()
    ledger.close()
