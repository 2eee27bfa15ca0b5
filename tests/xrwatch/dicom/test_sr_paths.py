"""Issue #21 item 1 against a real ``xrwatch serve``: a DICOM dropped into INCOMING with a
traversing SOPInstanceUID or StudyInstanceUID writes nothing outside REPORTS.

SR and SC paths come only from validated UIDs (or hashes of what is not one) and must
resolve under REPORTS; a source whose UIDs are not UIDs gets no SR, parked with the reason.
On the main before this fix, ``SOPInstanceUID = ../../../OUTSIDE/sopx`` wrote
``OUTSIDE/sopx.SR.dcm`` beside REPORTS.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
from serve_harness import run_once


def _drop(source: Path, target: Path, **uids: str) -> None:
    ds = pydicom.dcmread(source, force=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid UIDs it is given
        for keyword, value in uids.items():
            setattr(ds, keyword, value)
        if "SOPInstanceUID" in uids and "file_meta" in ds:
            ds.file_meta.MediaStorageSOPInstanceUID = uids["SOPInstanceUID"]
        ds.save_as(target, enforce_file_format=False)


def test_traversing_uids_in_a_dropped_file_write_nothing_outside_reports(
    folders, tiny_onnx_model: Path, real_dicoms: list[Path]
) -> None:
    incoming, reports = folders
    root = incoming.parent
    chest = real_dicoms[0]  # CR-MONO1-10-chest: a CR chest radiograph
    _drop(chest, incoming / "sop.dcm", SOPInstanceUID="../../../OUTSIDE/sopx")
    _drop(chest, incoming / "study.dcm", StudyInstanceUID="../../../OUTSIDE2",
          SOPInstanceUID="1.2.3.4.5.6")  # fmt: skip
    _drop(chest, incoming / "abs.dcm", StudyInstanceUID="/tmp", SOPInstanceUID="1.2.3.4.5.7")
    _drop(chest, incoming / "good.dcm", SOPInstanceUID="1.2.3.4.5.8")  # a valid control
    out = run_once(incoming, reports, tiny_onnx_model, "--dicom-sr", "--no-heatmaps")
    assert out.returncode in (0, 1), out.stderr
    written = sorted(p for p in root.rglob("*.dcm") if not p.is_relative_to(incoming))
    outside = [p for p in written if not p.resolve().is_relative_to(reports.resolve())]
    assert outside == []
    assert not (root / "OUTSIDE").exists() and not (root / "OUTSIDE2").exists()
    assert not any(Path("/tmp").glob("1.2.3.4.5.7*"))
    # The valid control still gets its SR, where it belongs; the others none, and why.
    study = str(pydicom.dcmread(chest, force=True, stop_before_pixels=True).StudyInstanceUID)
    assert [p.relative_to(reports).as_posix() for p in written] == [
        f"dicom/{study}/1.2.3.4.5.8.SR.dcm"
    ]
    assert out.stderr.count("is not a valid DICOM UID") == 3  # once each, parked
