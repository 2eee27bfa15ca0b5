"""What the receiver reads of an instance before it acknowledges it, in bounded memory.

The data set is walked element by element from its file without reading any value but
the few top-level attributes the receiver decides on (each at most :data:`KEEP_MAX`
bytes): sequences and encapsulated pixel data are stepped through item by item, never
built, so a hostile data set of millions of tiny elements costs no memory. The walk also
tells a complete instance from a cut one: an element whose value would run past the end
of the file, a sequence or item without its delimiter, or an image without its pixel data
(or with less than its header promises) is *truncated*, and the C-STORE fails at once
instead of being acknowledged and waited on.

Little-endian transfer syntaxes are walked; the deflated and the (retired) big-endian one
are read by pydicom (``stop_before_pixels``), as the folder would read them.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from xrwatch.dicom import provenance

logger = logging.getLogger(__name__)

KEEP_MAX = 1024  # bytes a kept attribute may have (UIDs, codes, names: far less)
MAX_DEPTH = 32  # sequences nested deeper are refused (a recursion bomb, not an image)
MAX_ELEMENTS = 500_000  # elements and items walked at most (an image has thousands; ~2 s)
PIXEL_DATA = 0x7FE00010
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_LONG_VRS.add(b"UV")
_KEEP = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "NumberOfFrames",
    "PhotometricInterpretation",
    *provenance.TAGS,
)


@dataclass(frozen=True)
class Header:
    """The attributes the receiver decides on, and whether the instance is complete."""

    sop_class: str | None
    sop_instance: str | None
    study: str | None
    series: str | None
    own_output: str | None  # why it looks made by xrwatch (``None``: it does not)
    problem: str | None  # why it is incomplete or unreadable (``None``: it is fine)


class _Cut(Exception):
    """The data set ends (or breaks) before its structure does."""


class _Walker:
    def __init__(self, fh: BinaryIO, size: int, implicit: bool) -> None:
        self.fh, self.size, self.implicit = fh, size, implicit
        self.count = 0

    def element(self) -> tuple[int, bytes | None, int, int]:
        """The next element header: ``(tag, VR or None, length, value offset)``."""
        self.count += 1
        if self.count > MAX_ELEMENTS:
            raise _Cut(f"more than {MAX_ELEMENTS} elements and items: refused, not walked")
        head = self.fh.read(8)
        if len(head) < 8:
            raise _Cut(f"the last {len(head)} bytes are an incomplete element")
        group, elem = struct.unpack("<HH", head[:4])
        tag = group << 16 | elem
        if self.implicit or group == 0xFFFE:  # items and delimiters have no VR
            return tag, None, struct.unpack("<L", head[4:])[0], self.fh.tell()
        vr = head[4:6]
        if vr in _LONG_VRS:
            more = self.fh.read(4)
            if len(more) < 4:
                raise _Cut("the last bytes are an incomplete element")
            return tag, vr, struct.unpack("<L", more)[0], self.fh.tell()
        return tag, vr, struct.unpack("<H", head[6:])[0], self.fh.tell()

    def skip(self, tag: int, length: int, at: int) -> None:
        if at + length > self.size:
            raise _Cut(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes, "
                f"{max(self.size - at, 0)} arrived"
            )
        self.fh.seek(at + length)

    def dataset(self, depth: int, keep: dict[int, tuple[bytes | None, bytes]] | None) -> int:
        """Walk a data set: to the end of the file (top level) or to its item's delimiter;
        return the top level's pixel data length (``-1``: none)."""
        pixel = -1
        while True:
            if depth == 0 and self.fh.tell() >= self.size:
                return pixel
            tag, vr, length, at = self.element()
            if tag == ITEM_END and depth > 0:
                return pixel
            if tag in (ITEM, ITEM_END, SEQUENCE_END):
                raise _Cut(f"an item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of place")
            if tag == PIXEL_DATA and depth == 0:
                pixel = length
            if length == UNDEFINED:
                implicit = self.implicit
                self.implicit = implicit or vr == b"UN"  # UN of undefined length: implicit
                self.items(depth + 1, encapsulated=tag == PIXEL_DATA)
                self.implicit = implicit
            elif keep is not None and tag in keep and length <= KEEP_MAX:
                self.skip(tag, length, at)
                self.fh.seek(at)
                keep[tag] = (vr, self.fh.read(length))
            else:
                self.skip(tag, length, at)

    def items(self, depth: int, encapsulated: bool) -> None:
        """Step through a sequence (or encapsulated pixel data) of undefined length."""
        if depth > MAX_DEPTH:
            raise _Cut(f"sequences nested more than {MAX_DEPTH} deep")
        while True:
            tag, _vr, length, at = self.element()
            if tag == SEQUENCE_END:
                return
            if tag != ITEM:
                raise _Cut(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where an item should be")
            if length != UNDEFINED:
                self.skip(tag, length, at)
            elif encapsulated:
                raise _Cut("a pixel data fragment of undefined length")
            else:
                self.dataset(depth, None)


def read_header(fh: BinaryIO, size: int, transfer_syntax: str, *, image: bool) -> Header:
    """Read the data set in ``fh`` (a received file: preamble, file meta, data set;
    ``size`` bytes). ``image``: the SOP class is one whose pixel data must be present."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag
    from pydicom.uid import UID

    def bad(problem: str) -> Header:
        return Header(None, None, None, None, None, problem)

    fh.seek(128)
    head = fh.read(16)  # "DICM", then (0002,0000) UL 4: the file meta's group length
    if len(head) < 16 or head[:4] != b"DICM" or head[4:12] != b"\x02\x00\x00\x00UL\x04\x00":
        return bad("its file meta information is missing or malformed")
    start = 144 + int.from_bytes(head[12:16], "little")
    ts = UID(transfer_syntax)
    if ts.is_deflated or not ts.is_little_endian:
        return _read_whole(fh)
    fh.seek(start)
    wanted = {int(Tag(k)) for k in _KEEP}
    keep: dict[int, tuple[bytes | None, bytes]] = {t: (None, b"") for t in wanted}
    try:
        pixel = _Walker(fh, size, ts.is_implicit_VR).dataset(0, keep)
    except _Cut as exc:
        why = str(exc)
        return bad(why if why.startswith("more than") else f"truncated: {why}")
    ds = Dataset()
    for tag, (vr, value) in keep.items():
        if vr is not None or value:
            vr_name = vr.decode("ascii", "replace") if vr else None
            ds[tag] = RawDataElement(
                Tag(tag), vr_name, len(value), value, 0, ts.is_implicit_VR, True
            )
    if image:
        if pixel < 0:
            return bad("truncated or incomplete: an image without pixel data")
        if pixel != UNDEFINED and not ts.is_compressed:
            expected = _expected_bytes(ds)
            if expected is not None and pixel < expected:
                return bad(
                    f"truncated: pixel data is {pixel} bytes, the header promises {expected}"
                )
    return _header(ds)


def _expected_bytes(ds: Any) -> int | None:
    from pydicom.pixels.utils import get_expected_length

    try:
        return int(get_expected_length(ds, unit="bytes"))
    except Exception:
        return None  # attributes missing: the reader reports it when it decodes


def _read_whole(fh: BinaryIO) -> Header:
    import pydicom

    fh.seek(0)
    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=list(_KEEP))
    except Exception as exc:
        return Header(None, None, None, None, None, f"its data set does not parse ({exc})")
    return _header(ds)


def _text(ds: Any, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    text = str(value).strip() if value is not None else ""
    return text or None


def _header(ds: Any) -> Header:
    try:
        own = provenance.own_output(ds)
    except Exception:  # a value that does not decode is not our mark
        own = None
    return Header(
        sop_class=_text(ds, "SOPClassUID"),
        sop_instance=_text(ds, "SOPInstanceUID"),
        study=_text(ds, "StudyInstanceUID"),
        series=_text(ds, "SeriesInstanceUID"),
        own_output=own,
        problem=None,
    )
