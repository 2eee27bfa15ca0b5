"""What the receiver reads of an instance before it acknowledges it, in bounded memory.

The data set is walked element by element from its file (values larger than
:data:`DEFER` are skipped, not read), keeping only the few attributes the receiver needs.
The walk also tells a complete instance from a cut one: an element whose value would run
past the end of the file, a sequence or encapsulated pixel data without its delimiter, or
an image without its pixel data (or with less than its header promises) is *truncated*,
and the C-STORE fails at once instead of being acknowledged and waited on.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO

from xrwatch.dicom import provenance

logger = logging.getLogger(__name__)

DEFER = 4096  # element values longer than this are skipped, never read into memory
PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
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


def _text(ds: Any, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    text = str(value).strip() if value is not None else ""
    return text or None


def read_header(fh: BinaryIO, size: int, transfer_syntax: str, *, image: bool) -> Header:
    """Read the data set in ``fh`` (a received file: preamble, file meta, data set;
    ``size`` bytes). ``image``: the SOP class is one whose pixel data must be present."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.filereader import data_element_generator
    from pydicom.uid import UID

    def bad(problem: str) -> Header:
        return Header(None, None, None, None, None, problem)

    fh.seek(128)
    head = fh.read(16)  # "DICM", then (0002,0000) UL 4: the file meta's group length
    if len(head) < 16 or head[:4] != b"DICM" or head[4:12] != b"\x02\x00\x00\x00UL\x04\x00":
        return bad("its file meta information is missing or malformed")
    start = 144 + int.from_bytes(head[12:16], "little")
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        # the deflated stream is only readable whole; its pixel data is checked when read
        return _from_whole(fh, size)
    fh.seek(start)
    wanted = {pydicom.datadict.tag_for_keyword(k) for k in _KEEP}
    kept: dict[Any, Any] = {}
    pixel: Any = None
    end = start
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for raw in data_element_generator(
                fh, ts.is_implicit_VR, ts.is_little_endian, defer_size=DEFER
            ):
                # a sequence comes parsed (a DataElement, read to its delimiter)
                length = int(getattr(raw, "length", UNDEFINED))
                tell = int(getattr(raw, "value_tell", 0))
                if length != UNDEFINED and tell + length > size:
                    return bad(
                        f"truncated: element {raw.tag} needs {length} bytes, "
                        f"{max(size - tell, 0)} arrived"
                    )
                end = fh.tell()  # past the value (or its delimiter)
                if raw.tag in wanted:
                    kept[raw.tag] = raw
                if raw.tag == PIXEL_DATA:
                    pixel = raw
    except EOFError as exc:
        return bad(f"truncated: {exc}")
    except Exception as exc:
        return bad(f"its data set does not parse ({type(exc).__name__}: {exc})")
    if end < size:  # the walk stopped inside an element's header
        return bad(f"truncated: the last {size - end} bytes are an incomplete element")
    ds = Dataset(kept)
    ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian, None)
    if image:
        if pixel is None:
            return bad("truncated or incomplete: an image without pixel data")
        declared = int(getattr(pixel, "length", UNDEFINED))
        if declared != UNDEFINED and not ts.is_compressed:
            expected = _expected_bytes(ds)
            if expected is not None and declared < expected:
                return bad(
                    f"truncated: pixel data is {declared} bytes, the header promises {expected}"
                )
    return _header(ds)


def _expected_bytes(ds: Any) -> int | None:
    from pydicom.pixels.utils import get_expected_length

    try:
        return int(get_expected_length(ds, unit="bytes"))
    except Exception:
        return None  # attributes missing: the reader reports it when it decodes


def _from_whole(fh: BinaryIO, size: int) -> Header:
    import pydicom

    fh.seek(0)
    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=list(_KEEP))
    except Exception as exc:
        return Header(None, None, None, None, None, f"its data set does not parse ({exc})")
    return _header(ds)


def _header(ds: Any) -> Header:
    return Header(
        sop_class=_text(ds, "SOPClassUID"),
        sop_instance=_text(ds, "SOPInstanceUID"),
        study=_text(ds, "StudyInstanceUID"),
        series=_text(ds, "SeriesInstanceUID"),
        own_output=provenance.own_output(ds),
        problem=None,
    )
