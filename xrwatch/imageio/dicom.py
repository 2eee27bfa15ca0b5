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
4. decode with pydicom's decoders (pylibjpeg plugins for JPEG, JPEG-LS, JPEG 2000);
   pydicom sign-extends signed data and masks bits above BitsStored;
5. grayscale: modality LUT (rescale or LUT sequence) -> VOI (:mod:`.voi`) -> MONOCHROME1
   inversion; colour (RGB, YBR, palette): ITU-R 601 luminance over the sample bit depth.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
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
from xrwatch.imageio.types import DecodedImage, ImageMeta
from xrwatch.imageio.voi import (
    VOIError,
    apply_modality_lut,
    apply_voi_lut,
    apply_window,
    robust_normalise,
)

logger = logging.getLogger(__name__)

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
    path: Path, ds: Any, source_mode: str, width: int, height: int, ts: str | None
) -> ImageMeta:
    return ImageMeta(
        path=str(path),
        kind="dicom",
        width=width,
        height=height,
        source_mode=source_mode,
        decoded_width=width,
        decoded_height=height,
        modality=_str(ds, "Modality"),
        photometric=_str(ds, "PhotometricInterpretation"),
        transfer_syntax=ts,
        sop_instance_uid=_str(ds, "SOPInstanceUID"),
        study_instance_uid=_str(ds, "StudyInstanceUID"),
        series_instance_uid=_str(ds, "SeriesInstanceUID"),
        accession_number=_str(ds, "AccessionNumber"),
        body_part=_str(ds, "BodyPartExamined"),
        view_position=_str(ds, "ViewPosition"),
    )


def _read_dataset(path: Path, data: bytes | None) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    source: Path | io.BytesIO = path if data is None else io.BytesIO(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
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
    messages = [str(w.message) for w in caught]
    for message in messages:
        logger.debug("%s: pydicom: %s", path, message)
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


def _check_pixel_data_complete(path: Path, ds: Any, ts: str) -> None:
    """Refuse pixel data shorter than the header promises, native or encapsulated."""
    from pydicom.uid import UID

    raw = ds.get("PixelData")
    if raw is None:
        return  # float pixel data: pydicom checks its length itself
    if not UID(ts).is_compressed:
        if "BitsAllocated" not in ds:
            raise ImageDecodeError(path, "DICOM lacks BitsAllocated; cannot read its pixel data")
        expected = _expected_native_bytes(ds)
        if len(raw) < expected:
            raise TruncatedImageError(
                path, f"pixel data is {len(raw):,} bytes but the header promises {expected:,}"
            )
        return
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


def _decode(path: Path, ds: Any, ts: str) -> tuple[np.ndarray, str]:
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
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            options: dict[str, Any] = {"as_rgb": True}  # YBR -> RGB while decoding
            arr, info = decoder.as_array(ds, index=0, **options)
    except Exception as exc:
        text = " ".join(str(exc).split())  # plugin errors span several lines
        raise ImageDecodeError(path, f"DICOM pixel data does not decode: {text}") from None
    for w in caught:
        logger.debug("%s: pixel decoder: %s", path, w.message)
    photometric = str(info.get("photometric_interpretation", ds.PhotometricInterpretation))
    return np.asarray(arr), photometric.upper()


def _grayscale(path: Path, ds: Any, arr: np.ndarray, photometric: str) -> np.ndarray:
    if arr.ndim != 2:
        raise UnsupportedImageError(
            path, f"expected one 2-D grayscale frame, decoded an array of shape {arr.shape}"
        )
    try:
        values = apply_modality_lut(arr, ds)
    except (VOIError, TypeError, ValueError) as exc:
        raise ImageDecodeError(path, f"modality LUT cannot be applied: {exc}") from None
    out = _voi(path, ds, values)
    if photometric == "MONOCHROME1":
        out = 1.0 - out  # explicit: pydicom's presentation-LUT helper does not do this
    return out


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _voi(path: Path, ds: Any, values: np.ndarray) -> np.ndarray:
    """VOI LUT Sequence (preferred, as pydicom does), else window, else robust range."""
    try:
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
            signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
            return apply_voi_lut(values, ds.VOILUTSequence[0], signed=signed)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            function = str(ds.get("VOILUTFunction", "") or "LINEAR")
            return apply_window(values, center, width, function)
    except (VOIError, TypeError, ValueError, IndexError) as exc:
        logger.warning("%s: ignoring unusable VOI (%s); normalising by the data range", path, exc)
    return robust_normalise(values)


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
    rgb = arr.astype(np.float64)
    luminance = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return np.clip(luminance / float(2**bits - 1), 0.0, 1.0)


def read_dicom(path: Path, *, max_pixels: int, data: bytes | None = None) -> DecodedImage:
    """Read a single-frame projection radiograph into a float32 2-D array in [0, 1].

    ``data``: the file's bytes when the caller already holds them (``path`` then only
    names the file).
    """
    ds = _read_dataset(path, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pydicom warns about odd values; log, don't print
        try:
            return _read_image(path, ds, max_pixels)
        except EOFError as exc:
            raise TruncatedImageError(path, f"DICOM file ends early: {exc}") from None
        except _MALFORMED as exc:
            # pydicom parses elements lazily: a malformed attribute or VR surfaces here
            raise ImageDecodeError(path, f"DICOM has an unreadable attribute: {exc}") from None
        finally:
            for w in caught:
                logger.debug("%s: pydicom: %s", path, w.message)


def _read_image(path: Path, ds: Any, max_pixels: int) -> DecodedImage:
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
    _check_pixel_data_complete(path, ds, ts)
    arr, decoded_photometric = _decode(path, ds, ts)
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0)
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        out = _grayscale(path, ds, arr, photometric)
        signed = "signed " if int(ds.get("PixelRepresentation", 0) or 0) == 1 else ""
        source_mode = f"{photometric} {signed}{bits_stored}-bit"
    else:
        out = _colour(path, ds, arr, decoded_photometric)
        source_mode = f"{photometric} {bits_stored}-bit -> luminance"
    if inferred:
        source_mode += " (transfer syntax inferred)"
    pixels = np.clip(np.ascontiguousarray(out, dtype=np.float32), 0.0, 1.0)
    return DecodedImage(pixels=pixels, meta=_meta(path, ds, source_mode, cols, rows, ts))
