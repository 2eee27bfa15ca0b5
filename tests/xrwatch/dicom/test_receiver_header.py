"""The receiver's header walk (no network): complete instances read, cut ones refused at
any byte, nesting and element-count bombs refused without memory, xrwatch's own marks."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.helpers.dicom_factory import gradient, write_dicom
from xrwatch.dicom import header as header_mod
from xrwatch.dicom.header import read_header
from xrwatch.dicom.provenance import own_output
from xrwatch.dicom.uids import UID_ROOT

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _read(raw: bytes, ts: str, image: bool = True) -> header_mod.Header:
    return read_header(io.BytesIO(raw), len(raw), ts, image=image)


@pytest.mark.parametrize(
    ("name", "image"),
    [("CT_small.dcm", True), ("JPEG2000.dcm", True), ("SC_rgb_rle.dcm", True),
     ("rtplan.dcm", False), ("test-SR.dcm", False)],
)  # fmt: skip
def test_complete_instances_read_and_every_cut_is_refused(name: str, image: bool) -> None:
    path = Path(get_testdata_file(name))
    raw = path.read_bytes()
    ds = pydicom.dcmread(path)
    ts = str(ds.file_meta.TransferSyntaxUID)
    whole = _read(raw, ts, image)
    assert whole.problem is None
    assert (whole.sop_class, whole.sop_instance, whole.study, whole.series) == (
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID
    )  # fmt: skip
    start = 144 + int.from_bytes(raw[140:144], "little")
    for cut in range(start + 1, len(raw), max(1, (len(raw) - start) // 97)):
        assert _read(raw[:cut], ts, image).problem is not None, cut
    assert _read(raw[:-1], ts, image).problem is not None


def test_pixel_data_shorter_than_the_header_promises_is_truncated(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a.dcm", pixels=gradient(64, 64))
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(path, enforce_file_format=True)
    problem = _read(path.read_bytes(), EXPLICIT_LE).problem
    assert problem is not None and "pixel data is 100 bytes" in problem


def _file(body: bytes) -> bytes:
    meta = b"\x02\x00\x10\x00UI\x14\x00" + EXPLICIT_LE.encode() + b"\x00"
    group = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<L", len(meta))
    return b"\x00" * 128 + b"DICM" + group + meta + body


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


SQ_START = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\x00\x00\xff\xff\xff\xff"
ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def test_bombs_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    uid = _element(0x0008, 0x0018, b"UI", b"1.2.3.4\x00")
    deep = SQ_START + (ITEM + SQ_START) * 40 + (SQ_END + ITEM_END) * 40 + SQ_END
    problem = _read(_file(uid + deep), EXPLICIT_LE, image=False).problem
    assert problem is not None and "nested more than" in problem
    monkeypatch.setattr(header_mod, "MAX_ELEMENTS", 1000)
    many = SQ_START + (ITEM + _element(0x0010, 0x0010, b"PN", b"AB") + ITEM_END) * 600 + SQ_END
    problem = _read(_file(uid + many), EXPLICIT_LE, image=False).problem
    assert problem is not None and problem.startswith("more than 1000 elements")
    few = SQ_START + (ITEM + _element(0x0010, 0x0010, b"PN", b"AB") + ITEM_END) * 100 + SQ_END
    assert _read(_file(uid + few), EXPLICIT_LE, image=False).sop_instance == "1.2.3.4"


def test_own_output_needs_both_marks_or_a_software_mark(tmp_path: Path) -> None:
    ours = f"{UID_ROOT}.4.1"
    assert own_output({"Manufacturer": "xrwatch", "SOPInstanceUID": ours})
    assert own_output({"Manufacturer": "xrwatch", "SOPInstanceUID": "1.2.3"}) is None
    assert own_output({"Manufacturer": "ACME", "SOPInstanceUID": ours}) is None
    assert own_output({"SoftwareVersions": ["ACME 2", "xrwatch 0.1.0"]})
    assert own_output({"ContentCreatorName": "xrwatch^AI"})
    path = write_dicom(
        tmp_path / "sc.dcm",
        pixels=gradient(32, 32),
        sop_instance_uid=ours,
        extra={"Manufacturer": "xrwatch"},
    )
    assert _read(path.read_bytes(), EXPLICIT_LE).own_output is not None
