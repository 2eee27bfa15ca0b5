"""Build small, synthetic DICOM files for tests (no patient data ever enters the repository).

Typical use::

    from tests.helpers.dicom_factory import write_dicom, gradient

    path = write_dicom(tmp_path / "a.dcm", pixels=gradient(64, 48), patient_name="Secret^Name")

Every identifying attribute (PatientName, PatientID, PatientBirthDate, UIDs,
AccessionNumber) can be set, so daemon and report tests can assert that the patient's name
never appears in their output. Pixel-related keywords shape the grayscale pipeline under
test: rescale, window (+ VOI LUT Function), VOI LUT sequence, modality LUT sequence,
signed data, BitsStored < BitsAllocated, MONOCHROME1, RGB, multi-frame, compression.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

DEFAULT_PATIENT_NAME = "Testpatient^Secret"  # tests assert this never reaches a report
DEFAULT_PATIENT_ID = "PID-0000-SECRET"
DEFAULT_BIRTH_DATE = "19600229"


def gradient(
    rows: int = 64,
    cols: int = 48,
    *,
    lo: int = 0,
    hi: int = 4095,
    dtype: type[np.integer[Any]] | np.dtype[Any] = np.uint16,
) -> np.ndarray:
    """A diagonal ramp from ``lo`` (top-left) to ``hi`` (bottom-right): every value differs."""
    y, x = np.mgrid[0:rows, 0:cols]
    ramp = (y / max(rows - 1, 1) + x / max(cols - 1, 1)) / 2.0
    return np.rint(lo + ramp * (hi - lo)).astype(dtype)


def _lut_item(descriptor: Sequence[int], data: Sequence[int], **extra: Any) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", list(descriptor))  # LUTDescriptor
    item.add_new(0x00283006, "US", [int(v) for v in data])  # LUTData
    for keyword, value in extra.items():
        setattr(item, keyword, value)
    return item


def build_dataset(
    *,
    pixels: np.ndarray | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool | None = None,
    modality: str = "DX",
    patient_name: str = DEFAULT_PATIENT_NAME,
    patient_id: str = DEFAULT_PATIENT_ID,
    patient_birth_date: str = DEFAULT_BIRTH_DATE,
    sop_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    accession_number: str = "ACC-0001",
    body_part: str = "CHEST",
    view_position: str = "PA",
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    voi_lut_function: str | None = None,
    voi_lut: tuple[int, int, Sequence[int]] | None = None,
    modality_lut: tuple[int, int, Sequence[int]] | None = None,
    number_of_frames: int | None = None,
    with_pixel_data: bool = True,
    sop_class_uid: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Dataset:
    """A single-frame DX (or SC for colour) dataset around ``pixels``.

    ``pixels``: 2-D uint8/uint16/int16 grayscale, (rows, cols, 3) uint8 RGB, or a 3-D
    (frames, rows, cols) stack when ``number_of_frames`` > 1. BitsAllocated follows the
    dtype; BitsStored defaults to it. ``voi_lut``/``modality_lut`` are
    ``(first_mapped_value, bits_per_entry, lut_data)``.
    """
    if pixels is None:
        pixels = gradient()
    pixels = np.ascontiguousarray(pixels)
    colour = photometric in ("RGB", "YBR_FULL")
    frames = number_of_frames or 1
    if colour:
        rows, cols = pixels.shape[-3], pixels.shape[-2]
    else:
        rows, cols = pixels.shape[-2], pixels.shape[-1]
    bits_allocated = pixels.dtype.itemsize * 8
    is_signed = pixels.dtype.kind == "i" if signed is None else signed

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = UID(
        sop_class_uid
        or (SecondaryCaptureImageStorage if colour else DigitalXRayImageStorageForPresentation)
    )
    sop_uid = UID(sop_instance_uid or generate_uid())
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.AccessionNumber = accession_number
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.StudyDate = "20240101"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if is_signed else 0
    if number_of_frames is not None:
        ds.NumberOfFrames = number_of_frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale[0], rescale[1]
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window[0], window[1]
    if voi_lut_function is not None:
        ds.VOILUTFunction = voi_lut_function
    if voi_lut is not None:
        first, bits, data = voi_lut
        ds.VOILUTSequence = DicomSequence([_lut_item((len(data), first, bits), data)])
    if modality_lut is not None:
        first, bits, data = modality_lut
        item = _lut_item((len(data), first, bits), data, ModalityLUTType="US")
        ds.ModalityLUTSequence = DicomSequence([item])
    if with_pixel_data:
        expected = rows * cols * ds.SamplesPerPixel * frames
        if pixels.size != expected:
            raise ValueError(f"pixels hold {pixels.size} samples, the header needs {expected}")
        data = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
        ds.PixelData = data + (b"\x00" if len(data) % 2 else b"")
        ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    return ds


def write_dicom(
    path: str | Path,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    preamble: bool = True,
    file_meta: bool = True,
    **kwargs: Any,
) -> Path:
    """Build a dataset (see :func:`build_dataset`) and write it to ``path``.

    ``transfer_syntax``: any native syntax, or a compressed one with an encoder here
    (RLE Lossless; JPEG 2000 via pylibjpeg-openjpeg). ``preamble=False`` writes no
    128-byte preamble nor ``DICM``; ``file_meta=False`` also drops the file meta group
    (an old ACR-NEMA-style file, so the transfer syntax must be inferred).
    """
    path = Path(path)
    ds = build_dataset(**kwargs)
    uid = UID(transfer_syntax)
    if uid == ExplicitVRBigEndian and "PixelData" in ds and int(ds.BitsAllocated) > 8:
        # pydicom writes OW bytes as given: swap them to the file's byte order
        words = np.frombuffer(ds.PixelData, dtype=f"<u{int(ds.BitsAllocated) // 8}")
        ds.PixelData = words.astype(words.dtype.newbyteorder(">")).tobytes()
    if uid.is_compressed:
        ds.compress(uid, encoding_plugin="pydicom" if uid.name == "RLE Lossless" else "")
    else:
        ds.file_meta.TransferSyntaxUID = uid
    if not file_meta:
        if uid not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian):
            raise ValueError("a file without file meta must use a native transfer syntax")
        ds.file_meta = FileMetaDataset()
        ds.preamble = None
        ds.save_as(
            path,
            implicit_vr=uid == ImplicitVRLittleEndian,
            little_endian=uid != ExplicitVRBigEndian,
            enforce_file_format=False,
        )
        return path
    if not preamble:
        ds.preamble = None
        ds.save_as(path, enforce_file_format=False)
        return path
    ds.save_as(path, enforce_file_format=True)
    return path


def truncate(path: str | Path, *, keep: int | None = None, drop: int | None = None) -> Path:
    """Cut ``path`` short in place: keep its first ``keep`` bytes or drop its last ``drop``."""
    path = Path(path)
    data = path.read_bytes()
    if (keep is None) == (drop is None):
        raise ValueError("give exactly one of keep= or drop=")
    end = keep if keep is not None else len(data) - (drop or 0)
    path.write_bytes(data[:end])
    return path
