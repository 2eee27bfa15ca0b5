"""DICOM reading: the dataset parsed, checked and described; its pixels made grey in [0, 1].

Checks follow torchxrayvision and the field's traps: pydicom's presentation-LUT helper
does not invert MONOCHROME1, a truncated compressed file can parse with zero elements and
only a warning, and ``force=True`` accepts anything, so every step is checked explicitly:

1. parse (``force=True`` so files without preamble read); a file that parses to nothing,
   whose last element is cut short, or whose encapsulated pixel data has no end delimiter,
   is truncated (pydicom's own log records tell some of these: :mod:`.pydicom_logs`);
2. a missing Transfer Syntax UID is inferred from how the dataset was encoded;
3. refuse what is not one single-frame projection radiograph (no pixel data, multi-frame,
   CT/MR/..., over the pixel limit, native data shorter than Rows x Columns promise,
   a compressed codestream without its end-of-image marker);
4. check the codestream's own size (JPEG 2000 SIZ, JPEG SOF) against the header and the
   pixel limit, then decode inside the process-wide decode memory budget (:mod:`.budget`):
   a large JPEG 2000 frame at reduced resolution when the caller needs far fewer pixels
   (``min_side``), plain (native) grayscale data box-averaged in blocks (:mod:`.boxreduce`);
5. map to grey in [0, 1]: modality LUT, VOI, MONOCHROME1 inversion, or colour luminance.

Decoding and the grey mapping (steps 4-5) are :mod:`.dicom_pixels`; this module owns the
dataset, its checks, its :class:`~xrwatch.imageio.types.ImageMeta` and :func:`read_dicom`.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from xrwatch.errors import (
    ImageDecodeError,
    ImageTooLargeError,
    NotARadiographError,
    TruncatedImageError,
    UnsupportedImageError,
)
from xrwatch.flags import age_years
from xrwatch.imageio.boxreduce import box_factor, box_reduce
from xrwatch.imageio.budget import DECODE_BUDGET, estimate_decode_bytes
from xrwatch.imageio.codestream import FrameSize, j2k_frame_size, jpeg_frame_size
from xrwatch.imageio.dicom_pixels import (
    decode_frame,
    decode_j2k_reduced,
    grey_from_colour,
    grey_from_monochrome,
    native_view,
    reduce_levels,
)
from xrwatch.imageio.pydicom_logs import capture_library_logs
from xrwatch.imageio.types import DecodedImage, ImageMeta

logger = logging.getLogger(__name__)

# Modalities that are projection radiographs; anything else (CT, MR, US...) is refused.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "RF", "XA", "MG", "PX", "OT", "SC"})
COLOUR_PHOTOMETRICS = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR"}
)
_IMAGE_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Encapsulated syntaxes whose codestream must end with an EOI/EOC marker (FF D9): JPEG
# (baseline, extended, lossless), JPEG-LS, JPEG 2000 and HTJ2K. Not RLE, not video.
_ENDS_WITH_EOI = frozenset(
    "1.2.840.10008.1.2.4." + suffix
    for suffix in ("50", "51", "57", "70", "80", "81", "90", "91", "92", "93", "201", "202", "203")
)


# What pydicom raises when it meets a malformed element while converting it on access.
_MALFORMED = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    NotImplementedError,  # unknown VR
    OverflowError,
    struct.error,
)


def _str(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)


def _meta(
    path: Path,
    ds: Any,
    source_mode: str,
    width: int,
    height: int,
    ts: str | None,
    decoded: tuple[int, int] | None = None,
) -> ImageMeta:
    decoded_height, decoded_width = decoded or (height, width)
    return ImageMeta(
        path=str(path),
        kind="dicom",
        width=width,
        height=height,
        source_mode=source_mode,
        decoded_width=decoded_width,
        decoded_height=decoded_height,
        modality=_str(ds, "Modality"),
        photometric=_str(ds, "PhotometricInterpretation"),
        transfer_syntax=ts,
        sop_instance_uid=_str(ds, "SOPInstanceUID"),
        study_instance_uid=_str(ds, "StudyInstanceUID"),
        series_instance_uid=_str(ds, "SeriesInstanceUID"),
        accession_number=_str(ds, "AccessionNumber"),
        body_part=_str(ds, "BodyPartExamined"),
        view_position=_str(ds, "ViewPosition"),
        presentation_intent=_str(ds, "PresentationIntentType"),
        patient_age_years=age_years(
            _str(ds, "PatientAge"), _str(ds, "PatientBirthDate"), _str(ds, "StudyDate")
        ),
    )


def _read_dataset(path: Path, data: bytes | None) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    source: Path | io.BytesIO = path if data is None else io.BytesIO(data)
    with capture_library_logs(path) as messages:
        try:
            ds = pydicom.dcmread(source, force=True)
        except InvalidDicomError as exc:
            raise UnsupportedImageError(path, f"not a valid DICOM file: {exc}") from None
        except EOFError as exc:
            raise TruncatedImageError(path, f"DICOM file ends early: {exc}") from None
        except (struct.error, OSError) as exc:
            # pydicom ran out of bytes inside an element header ("No tag to read at file
            # position ...", "unpack requires a buffer of 4 bytes"): cut short, maybe
            # still being copied, so the daemon waits rather than reporting at once.
            raise TruncatedImageError(
                path, f"DICOM header ends mid-element (still being written?): {exc}"
            ) from None
        except Exception as exc:
            raise ImageDecodeError(path, f"DICOM header does not parse: {exc}") from None
    ended_early = [m for m in messages if "end of file" in m.lower() or "delimiter" in m.lower()]
    if ended_early:
        raise TruncatedImageError(
            path, f"DICOM file ends before its data does (still being written?): {ended_early[0]}"
        )
    if len(ds) == 0:
        raise TruncatedImageError(path, "DICOM file holds no data elements (truncated or corrupt)")
    _check_last_element_complete(path, ds)
    return ds


def _check_last_element_complete(path: Path, ds: Any) -> None:
    """pydicom reads a value cut short by the end of the file without complaint; a file
    cut inside its header then looks like a complete dataset without pixel data. The last
    element's declared length tells the two apart."""
    from pydicom.dataelem import RawDataElement

    tags = list(ds.keys())
    if not tags:
        return
    last = ds.get_item(tags[-1])
    if not isinstance(last, RawDataElement) or last.value is None:
        return
    if last.tag == 0x7FE00010:  # PixelData: read_dicom's own check says more
        return
    declared = int(last.length)
    if declared != 0xFFFFFFFF and len(last.value) < declared:
        raise TruncatedImageError(
            path,
            f"DICOM file ends inside element {last.tag} ({len(last.value)} of {declared} "
            "bytes; still being written?)",
        )


def _transfer_syntax(path: Path, ds: Any) -> tuple[str, bool]:
    """The dataset's Transfer Syntax UID, inferred (and set) when the file meta lacks one.

    Returns ``(uid, inferred)``. Old files without a meta header are read by pydicom
    guessing the encoding; that guess is the transfer syntax.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        UID,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts:
        return str(ts), False
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        raise ImageDecodeError(path, "DICOM has no Transfer Syntax UID and its encoding is unknown")
    if implicit and not little:
        raise ImageDecodeError(path, "DICOM encoding is implicit VR big endian, which is not valid")
    uid: UID = (
        ImplicitVRLittleEndian
        if implicit
        else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    )
    ds.file_meta.TransferSyntaxUID = uid
    logger.debug("%s: no Transfer Syntax UID in the file meta; inferred %s", path, uid.name)
    return str(uid), True


def _expected_native_bytes(ds: Any) -> int:
    from pydicom.pixels.utils import get_expected_length

    return int(get_expected_length(ds, unit="bytes"))  # knows YBR_FULL_422 subsampling


_J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
_JPEG_SYNTAXES = frozenset(
    "1.2.840.10008.1.2.4." + suffix for suffix in ("50", "51", "57", "70", "80", "81")
)


def _check_pixel_data_complete(path: Path, ds: Any, ts: str) -> bytes | None:
    """Refuse pixel data shorter than the header promises, native or encapsulated.

    Returns the first compressed frame (all its fragments joined), ``None`` when native.
    """
    from pydicom.uid import UID

    raw = ds.get("PixelData")
    if raw is None:
        return None  # float pixel data: pydicom checks its length itself
    if not UID(ts).is_compressed:
        if "BitsAllocated" not in ds:
            raise ImageDecodeError(path, "DICOM lacks BitsAllocated; cannot read its pixel data")
        expected = _expected_native_bytes(ds)
        if len(raw) < expected:
            raise TruncatedImageError(
                path, f"pixel data is {len(raw):,} bytes but the header promises {expected:,}"
            )
        return None
    from pydicom.encaps import generate_fragments

    try:
        fragments = list(generate_fragments(raw))
    except Exception as exc:
        raise TruncatedImageError(path, f"encapsulated pixel data is malformed: {exc}") from None
    fragments = [f for f in fragments[1:] if f] if fragments else []  # [0] = offset table
    if not fragments:
        raise TruncatedImageError(path, "encapsulated pixel data holds no compressed fragments")
    if ts in _ENDS_WITH_EOI:
        tail = fragments[-1].rstrip(b"\x00")[-4:]
        if b"\xff\xd9" not in tail:
            raise TruncatedImageError(
                path, "compressed image ends without its end-of-image marker (FF D9): truncated"
            )
    return b"".join(fragments)  # single-frame: every fragment belongs to the one frame


def _check_codestream_size(
    path: Path, ts: str, frame: bytes | None, rows: int, cols: int, max_pixels: int
) -> FrameSize | None:
    """The codestream's own size must match the header and the pixel limit (no decoding)."""
    if frame is None:
        return None
    if ts in _J2K_SYNTAXES:
        size, what = j2k_frame_size(frame), "JPEG 2000 codestream (SIZ)"
    elif ts in _JPEG_SYNTAXES:
        size, what = jpeg_frame_size(frame), "JPEG codestream (SOF)"
    else:
        return None
    if size is None:
        raise ImageDecodeError(
            path, f"compressed pixel data does not decode: no {what} found before its data"
        )
    pixels = size.width * size.height
    if pixels > max_pixels:
        raise ImageTooLargeError(
            path,
            f"the {what} declares {size.width}x{size.height} = {pixels:,} pixels, over the "
            f"limit of {max_pixels:,} (decompression-bomb guard); nothing was decoded",
        )
    # A JPEG may leave its height to a DNL marker (height 0): only the width is checked then.
    if size.width != cols or (size.height not in (rows, 0) if size.sof else size.height != rows):
        raise ImageDecodeError(
            path,
            f"the {what} is {size.width}x{size.height} but the DICOM header says "
            f"{cols}x{rows} (Columns x Rows); refused before decoding",
        )
    return size


def read_dicom(
    path: Path, *, max_pixels: int, data: bytes | None = None, min_side: int | None = None
) -> DecodedImage:
    """Read a single-frame projection radiograph into a float32 2-D array in [0, 1].

    ``data``: the file's bytes when the caller already holds them (``path`` then only
    names the file). ``min_side``: the caller needs no more pixels than this on the shorter
    side, so a large JPEG 2000 frame may be decoded at reduced resolution, and the stored
    values of native grayscale data are averaged in blocks before the LUTs.
    """
    ds = _read_dataset(path, data)
    with capture_library_logs(path):
        try:
            return _read_image(path, ds, max_pixels, min_side)
        except EOFError as exc:
            raise TruncatedImageError(path, f"DICOM file ends early: {exc}") from None
        except _MALFORMED as exc:
            # pydicom parses elements lazily: a malformed attribute or VR surfaces here
            raise ImageDecodeError(path, f"DICOM has an unreadable attribute: {exc}") from None


def _read_image(path: Path, ds: Any, max_pixels: int, min_side: int | None) -> DecodedImage:
    if not any(tag in ds for tag in _IMAGE_PIXEL_TAGS):
        sop = ds.get("SOPClassUID")
        if not sop and getattr(ds, "file_meta", None) is not None:
            # the dataset was cut before its SOP Class UID: the file meta still says
            sop = ds.file_meta.get("MediaStorageSOPClassUID")
        what = getattr(sop, "name", None) or (str(sop) if sop else "an unknown SOP class")
        if "Image Storage" in what or "Rows" in ds:
            raise TruncatedImageError(
                path, f"DICOM ends before its pixel data although it is an image ({what})"
            )
        raise UnsupportedImageError(
            path, f"DICOM has no pixel data (SOP class: {what}); a radiograph image is expected"
        )
    modality = (_str(ds, "Modality") or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise NotARadiographError(
            path, f"DICOM modality is {modality}, not a projection radiograph (CR/DX expected)"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, ValueError, TypeError):
        raise ImageDecodeError(path, "DICOM lacks valid Rows/Columns") from None
    if rows <= 0 or cols <= 0:
        raise ImageDecodeError(path, f"DICOM declares an empty image ({cols}x{rows})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnsupportedImageError(
            path, f"multi-frame DICOM ({frames} frames); a single-frame radiograph is expected"
        )
    if rows * cols > max_pixels:
        raise ImageTooLargeError(
            path,
            f"{cols}x{rows} = {rows * cols:,} pixels exceeds the limit of {max_pixels:,} "
            "(decompression-bomb guard); nothing was decoded",
        )
    photometric = (_str(ds, "PhotometricInterpretation") or "").upper()
    if photometric not in COLOUR_PHOTOMETRICS and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(
            path,
            f"unsupported PhotometricInterpretation {photometric or '(missing)'}; expected "
            "MONOCHROME1, MONOCHROME2, RGB, YBR or PALETTE COLOR",
        )
    ts, inferred = _transfer_syntax(path, ds)
    frame = _check_pixel_data_complete(path, ds, ts)
    size = _check_codestream_size(path, ts, frame, rows, cols, max_pixels)
    samples = 3 if photometric in COLOUR_PHOTOMETRICS else 1
    sample_bytes = (int(ds.get("BitsAllocated", 16) or 16) + 7) // 8
    reduce = reduce_levels(size, min_side) if ts in _J2K_SYNTAXES else 0
    signed_pixels = int(ds.get("PixelRepresentation", 0) or 0) == 1
    stored_bits = int(ds.get("BitsStored", 0) or 0)
    if (
        photometric not in ("MONOCHROME1", "MONOCHROME2")
        or signed_pixels
        or (size is not None and stored_bits != size.precision)
    ):
        reduce = 0  # only where the reduced decode gives exactly what pydicom's would
    decode_pixels = (
        rows * cols if not reduce else math.ceil(rows / 2**reduce) * math.ceil(cols / 2**reduce)
    )
    with DECODE_BUDGET.reserve(estimate_decode_bytes(decode_pixels, sample_bytes, samples)):
        arr = None
        if reduce and frame is not None and size is not None:
            arr = decode_j2k_reduced(path, frame, size, reduce)
        elif photometric in ("MONOCHROME1", "MONOCHROME2"):
            arr = native_view(ds, ts, rows, cols)
            factor = box_factor(rows, cols, min_side)
            if arr is not None and factor > 1:
                arr = box_reduce(arr, factor, bits=stored_bits or None)
        if arr is None:
            arr, decoded_photometric = decode_frame(path, ds, ts, frame)
        else:
            decoded_photometric = photometric
        source_is_float = arr.dtype.kind not in "ui"
        bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0)
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            out = grey_from_monochrome(path, ds, arr, photometric)
            signed = "signed " if int(ds.get("PixelRepresentation", 0) or 0) == 1 else ""
            source_mode = f"{photometric} {signed}{bits_stored}-bit"
        else:
            out = grey_from_colour(path, ds, arr, decoded_photometric)
            source_mode = f"{photometric} {bits_stored}-bit -> luminance"
        del arr
        pixels = np.ascontiguousarray(out, dtype=np.float32)  # already clipped to [0, 1]
    # NaN survives clipping (float pixel data, or anything unforeseen): never pass it on.
    # Integer pixels are mapped by finite numbers (checked), so only float data can hold it.
    if source_is_float and not math.isfinite(float(pixels.sum())):
        raise ImageDecodeError(path, "decoding gave non-finite pixel values (NaN)")
    if inferred:
        source_mode += " (transfer syntax inferred)"
    meta = _meta(path, ds, source_mode, cols, rows, ts, decoded=pixels.shape)
    return DecodedImage(pixels=pixels, meta=meta)
