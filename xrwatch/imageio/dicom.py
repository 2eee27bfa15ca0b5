"""DICOM reading: modality LUT, VOI, explicit MONOCHROME1 inversion, then [0, 1].

Checks follow torchxrayvision and the field's traps: pydicom's presentation-LUT helper
does not invert MONOCHROME1, a truncated compressed file can parse with zero elements and
only a warning, and ``force=True`` accepts anything, so every step is checked explicitly:

1. parse (``force=True`` so files without preamble read); a file that parses to nothing,
   or whose encapsulated pixel data has no end delimiter, is truncated;
2. a missing Transfer Syntax UID is inferred from how the dataset was encoded;
3. refuse what is not one single-frame projection radiograph (no pixel data, multi-frame,
   CT/MR/..., over the pixel limit, native data shorter than Rows x Columns promise,
   a compressed codestream without its end-of-image marker);
4. check the codestream's own size (JPEG 2000 SIZ, JPEG SOF) against the header and the
   pixel limit, then decode with pydicom's decoders (pylibjpeg plugins for JPEG, JPEG-LS,
   JPEG 2000) inside the process-wide decode memory budget (:mod:`.budget`); pydicom
   sign-extends signed data and masks bits above BitsStored. A large JPEG 2000 frame is
   decoded at reduced resolution when the caller needs far fewer pixels (``min_side``),
   and plain (native) grayscale data is box-averaged in blocks (:mod:`.boxreduce`);
5. grayscale: modality LUT (rescale or LUT sequence) -> VOI (:mod:`.voi`) -> inversion
   (MONOCHROME1, or Presentation LUT Shape INVERSE); colour (RGB, YBR, palette): ITU-R 601
   luminance over the sample bit depth. Non-finite rescale/window values are an error.

pydicom reports what it meets through its logger (and repeats it as a Python warning,
without the file's name). Its loggers are routed here: while a file is read their records
are collected, checked (an early end of file means truncation) and logged at DEBUG with the
file's name, never with a plugin's traceback; the duplicate Python warnings are ignored
process-wide (``warnings.catch_warnings`` is not thread-safe, and the daemon reads in
several threads).
"""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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
from xrwatch.imageio.codestream import (
    FrameSize,
    j2k_frame_size,
    jpeg_frame_size,
    patch_jpeg_scan_end,
)
from xrwatch.imageio.types import DecodedImage, ImageMeta
from xrwatch.imageio.voi import VOIError, grayscale_to_unit

logger = logging.getLogger(__name__)

# --- pydicom's own logging and warnings -------------------------------------------------

_LIBRARY_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg")
_CAPTURED: ContextVar[list[str] | None] = ContextVar("xrwatch_dicom_captured", default=None)


class _LibraryLogFilter(logging.Filter):
    """Takes pydicom's (and its plugins') records out of the log; keeps their one-line text.

    While a file is read the text is collected for that file (see
    :func:`_capture_library_logs`); otherwise it is logged here at DEBUG.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = " ".join(record.getMessage().split())  # one line, no traceback
        except Exception:  # a malformed record must not break a read
            message = str(record.msg)
        captured = _CAPTURED.get()
        if captured is not None:
            captured.append(message)
        else:  # pydicom used outside read_dicom (tests, training tools)
            logger.debug("%s: %s", record.name, message)
        return False


_FILTER = _LibraryLogFilter()
_LOGGERS_SEEN = -1  # size of logging's logger registry when the filter was last placed


def _route_library_logs() -> None:
    """Put the filter on pydicom's loggers and their children (a filter on a logger does not
    see its children's records). Repeated at each read: plugins create loggers when first
    imported."""
    global _LOGGERS_SEEN
    manager = logging.getLogger().manager
    if len(manager.loggerDict) == _LOGGERS_SEEN:
        return  # no logger created since the last look
    _LOGGERS_SEEN = len(manager.loggerDict)
    names = [n for n in list(manager.loggerDict) if n.split(".")[0] in _LIBRARY_LOGGERS]
    for name in {*names, *_LIBRARY_LOGGERS}:
        lib = logging.getLogger(name)
        if _FILTER not in lib.filters:
            lib.addFilter(_FILTER)
        if name in _LIBRARY_LOGGERS and lib.level != logging.WARNING:
            lib.setLevel(logging.WARNING)  # warnings tell truncation; debug chatter is costly


_WARNING_MODULES = "(" + "|".join(_LIBRARY_LOGGERS) + r")(\.|$)"


def _ignore_library_warnings() -> None:
    """pydicom repeats each logged message as a Python warning: ignore those, process-wide.

    Checked at every read, not only at import, because a test runner (or an application)
    may restore the warning filters in between.
    """
    for f in warnings.filters:
        if f[0] == "ignore" and f[3] is not None and f[3].pattern == _WARNING_MODULES:
            return
    warnings.filterwarnings("ignore", module=_WARNING_MODULES)


_route_library_logs()


@contextmanager
def _capture_library_logs(path: Path) -> Iterator[list[str]]:
    """Collect pydicom's log messages while reading ``path``; log them at DEBUG after."""
    _ignore_library_warnings()
    _route_library_logs()
    captured: list[str] = []
    token = _CAPTURED.set(captured)
    try:
        yield captured
    finally:
        _CAPTURED.reset(token)
        for message in captured:
            logger.debug("%s: pydicom: %s", path, message)


# Modalities that are projection radiographs; anything else (CT, MR, US...) is refused.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "RF", "XA", "MG", "PX", "OT", "SC"})
COLOUR_PHOTOMETRICS = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR"}
)
_IMAGE_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PLUGIN_HINT = (
    "install the DICOM pixel plugins: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
)
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
    with _capture_library_logs(path) as messages:
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
_SEQUENTIAL_JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
# JPEG 2000 is decoded at reduced resolution only when this saves at least one level.
REDUCE_MIN_FACTOR = 2


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


def _reduce_levels(size: FrameSize | None, min_side: int | None) -> int:
    """How many JPEG 2000 resolution levels can be skipped with the shorter side >= min_side."""
    if size is None or min_side is None or min_side <= 0 or not size.levels:
        return 0
    if size.components != 1 or size.signed or size.precision > 16:
        return 0  # Pillow's JPEG 2000 reader, which can reduce, maps these differently
    short = min(size.width, size.height)
    if short < REDUCE_MIN_FACTOR * min_side:
        return 0
    levels = 0
    while levels < size.levels and math.ceil(short / (2 ** (levels + 1))) >= min_side:
        levels += 1
    return levels


def _decode_j2k_reduced(
    path: Path, frame: bytes, size: FrameSize, levels: int
) -> np.ndarray | None:
    """OpenJPEG (through Pillow) decoding only the lower resolution levels; None on failure."""
    from PIL import Image

    power = 1 << levels
    width, height = math.ceil(size.width / power), math.ceil(size.height / power)
    try:
        with Image.open(io.BytesIO(frame)) as img:
            # Pillow rounds the reduced size to nearest; OpenJPEG's is the ceiling. Give
            # Pillow the size whose rounding is that ceiling.
            img._size = (width * power - (power >> 1), height * power - (power >> 1))
            img.reduce = levels  # type: ignore[assignment]
            img.load()
            arr = np.asarray(img)
    except Exception as exc:
        logger.debug("%s: reduced JPEG 2000 decode failed (%s); decoding in full", path, exc)
        return None
    if arr.shape != (height, width):
        logger.debug("%s: reduced JPEG 2000 decode gave %s; decoding in full", path, arr.shape)
        return None
    if arr.dtype == np.uint16 and size.precision < 16:
        arr = arr >> (16 - size.precision)  # Pillow scales samples to 16 bits
    return _centre_reduced(arr, levels, (size.height, size.width))


def _centre_reduced(arr: np.ndarray, levels: int, full: tuple[int, int]) -> np.ndarray:
    """Resample the reduced image so its samples evenly cover the full image, block-centred.

    After ``levels`` wavelet levels, sample n lies at full-resolution position
    ``n * 2**levels``, not at the centre of the block it stands for (where an area resize, or
    JPEG's DCT scaling, puts it), and the last sample covers a partial block when a side is
    not a multiple of ``2**levels``. Left alone, both shift every edge of the model input by
    up to ~0.4 reduced pixels. Output sample j of n is taken (linear interpolation, edges
    replicated) at full-resolution position ``(j + 0.5) * side / n - 0.5``; float32 out.
    """
    out = arr.astype(np.float32)
    power = float(1 << levels)
    for axis, side in enumerate(full):
        n = out.shape[axis]
        pos = ((np.arange(n) + 0.5) * (side / n) - 0.5) / power
        pos = np.clip(pos, 0.0, n - 1.0)
        lower = np.floor(pos).astype(np.intp)
        upper = np.minimum(lower + 1, n - 1)
        shape = [1, 1]
        shape[axis] = n
        frac = (pos - lower).astype(np.float32).reshape(shape)
        out = np.take(out, lower, axis=axis) * (1 - frac) + np.take(out, upper, axis=axis) * frac
    return out


def _decode(path: Path, ds: Any, ts: str, frame: bytes | None) -> tuple[np.ndarray, str]:
    """Decode the single frame; return ``(array, photometric after decoding)``."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImageDecodeError(
            path, f"no decoder exists for transfer syntax {ts}; {_PLUGIN_HINT}"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "none listed"
        raise ImageDecodeError(
            path,
            f"no installed plugin decodes {decoder.UID.name} (missing: {missing}); {_PLUGIN_HINT}",
        )
    if ts in _SEQUENTIAL_JPEG and frame is not None:
        patched = patch_jpeg_scan_end(frame)
        if patched is not None:
            from pydicom.encaps import encapsulate

            logger.debug("%s: JPEG scan header ends with Se = 0; decoding it as 63", path)
            ds.PixelData = encapsulate([patched])
    try:
        options: dict[str, Any] = {"as_rgb": True}  # YBR -> RGB while decoding
        arr, info = decoder.as_array(ds, index=0, **options)
    except Exception as exc:
        text = " ".join(str(exc).split())  # plugin errors span several lines
        raise ImageDecodeError(path, f"DICOM pixel data does not decode: {text}") from None
    photometric = str(info.get("photometric_interpretation", ds.PhotometricInterpretation))
    return np.asarray(arr), photometric.upper()


_LITTLE_ENDIAN_NATIVE = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}
)


def _native_view(ds: Any, ts: str, rows: int, cols: int) -> np.ndarray | None:
    """The stored values of plain little-endian grayscale data, without a copy; else None.

    What pydicom's native decoder would return (it copies, then masks the bits above
    BitsStored): 8/16-bit, one sample, unsigned (masked here only when a value needs it) or
    signed with BitsStored = BitsAllocated. Anything else goes through pydicom.
    """
    if ts not in _LITTLE_ENDIAN_NATIVE or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    raw = ds.get("PixelData")
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", allocated) or allocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if not isinstance(raw, bytes) or allocated not in (8, 16) or not 1 <= stored <= allocated:
        return None
    if signed and stored != allocated:
        return None  # needs sign extension: pydicom does it
    if len(raw) < rows * cols * (allocated // 8):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    arr = np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if not signed and stored < allocated and int(arr.max()) >> stored:
        arr = arr & np.asarray((1 << stored) - 1, dtype=dtype)  # overlay/garbage bits
    return arr


def _finite_value(path: Path, ds: Any, keyword: str, default: float) -> float:
    """A numeric attribute (first value if multi-valued), refused when NaN or infinite."""
    raw = ds.get(keyword)
    if raw is None or raw == "":
        return default
    value = _first(raw)
    if not math.isfinite(value):
        raise ImageDecodeError(
            path, f"DICOM {keyword} is {value}, not a finite number; the image cannot be scaled"
        )
    return value


def _inverted(ds: Any, photometric: str) -> bool:
    """Whether low values are bright: MONOCHROME1, or MONOCHROME2 with a Presentation LUT
    Shape of INVERSE (PS3.3 C.11.6). MONOCHROME1 with INVERSE is the usual DX encoding of the
    same polarity (C.8.11.6.1.2), inverted once."""
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _grayscale(path: Path, ds: Any, arr: np.ndarray, photometric: str) -> np.ndarray:
    if arr.ndim != 2:
        raise UnsupportedImageError(
            path, f"expected one 2-D grayscale frame, decoded an array of shape {arr.shape}"
        )
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    modality_lut = None
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence) > 0:
        modality_lut = ds.ModalityLUTSequence[0]
        slope, intercept = 1.0, 0.0
    else:
        slope = _finite_value(path, ds, "RescaleSlope", 1.0) or 1.0
        intercept = _finite_value(path, ds, "RescaleIntercept", 0.0)
    voi_lut, window = None, None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        voi_lut = ds.VOILUTSequence[0]
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center = _finite_value(path, ds, "WindowCenter", math.nan)
            width = _finite_value(path, ds, "WindowWidth", math.nan)
        except (TypeError, ValueError, IndexError) as exc:  # not a number at all
            center = width = math.nan
            logger.warning(
                "%s: ignoring unusable VOI (%s); normalising by the data range", path, exc
            )
        function = str(ds.get("VOILUTFunction", "") or "LINEAR")
        if not (math.isnan(center) or math.isnan(width)):
            window = (center, width, function)
    try:
        return grayscale_to_unit(
            arr,
            slope=slope,
            intercept=intercept,
            modality_lut=modality_lut,
            voi_lut=voi_lut,
            window=window,
            signed=signed,
            invert=_inverted(ds, photometric),
            label=str(path),
        )
    except (VOIError, TypeError, ValueError) as exc:
        raise ImageDecodeError(path, f"modality LUT cannot be applied: {exc}") from None


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _colour(path: Path, ds: Any, arr: np.ndarray, photometric: str) -> np.ndarray:
    """ITU-R 601 luminance of a colour image, scaled by its sample bit depth."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception as exc:
            raise ImageDecodeError(path, f"palette colour lookup failed: {exc}") from None
    elif photometric in ("YBR_FULL", "YBR_FULL_422"):  # the decoder left it as YBR
        arr = convert_color_space(arr, photometric, "RGB")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UnsupportedImageError(
            path, f"expected one colour frame (rows, columns, 3), decoded shape {arr.shape}"
        )
    rgb = arr.astype(np.float32)
    luminance = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return np.clip(luminance / np.float32(2**bits - 1), 0.0, 1.0)


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
    with _capture_library_logs(path):
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
    reduce = _reduce_levels(size, min_side) if ts in _J2K_SYNTAXES else 0
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
            arr = _decode_j2k_reduced(path, frame, size, reduce)
        elif photometric in ("MONOCHROME1", "MONOCHROME2"):
            arr = _native_view(ds, ts, rows, cols)
            factor = box_factor(rows, cols, min_side)
            if arr is not None and factor > 1:
                arr = box_reduce(arr, factor, bits=stored_bits or None)
        if arr is None:
            arr, decoded_photometric = _decode(path, ds, ts, frame)
        else:
            decoded_photometric = photometric
        source_is_float = arr.dtype.kind not in "ui"
        bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0)
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            out = _grayscale(path, ds, arr, photometric)
            signed = "signed " if int(ds.get("PixelRepresentation", 0) or 0) == 1 else ""
            source_mode = f"{photometric} {signed}{bits_stored}-bit"
        else:
            out = _colour(path, ds, arr, decoded_photometric)
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
