"""What a compressed DICOM frame says about itself, read from its marker segments.

The DICOM header's Rows/Columns are only a claim: the codestream inside decides what the
decoder allocates. These parsers read the JPEG 2000 SIZ and COD segments and the JPEG SOF
segment without decoding anything, so a frame that is larger than its header (or than the
pixel limit) is refused before a byte of pixels is allocated.

:func:`patch_jpeg_scan_end` repairs one known encoder defect: sequential DCT JPEG
(baseline, extended) whose scan header ends the spectral selection with Se = 0 instead of
63. DCMTK and GDCM ignore Se for sequential scans; libjpeg refuses the stream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SOC = b"\xff\x4f"  # JPEG 2000 start of codestream
SIZ = b"\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# JPEG start-of-frame markers (C0-CF except DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55 (F7)
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}) | {0xF7}
_SEQUENTIAL_DCT = frozenset({0xC0, 0xC1})  # baseline and extended sequential (Huffman)
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length


@dataclass(frozen=True)
class FrameSize:
    """Size and sample layout a codestream declares."""

    width: int
    height: int
    components: int
    precision: int  # bits per sample of the first component
    signed: bool = False
    levels: int | None = None  # JPEG 2000 wavelet decomposition levels (COD)
    sof: int | None = None  # JPEG start-of-frame marker (0xC0 ...), None for JPEG 2000


def _j2k_codestream(frame: bytes) -> bytes | None:
    """The raw codestream: the frame itself, or the ``jp2c`` box of a JP2 file."""
    if frame.startswith(SOC):
        return frame
    if frame.startswith(JP2_SIGNATURE):
        start = frame.find(b"jp2c")
        if start >= 4 and frame[start + 4 : start + 6] == SOC:
            return frame[start + 4 :]
    return None


def j2k_frame_size(frame: bytes) -> FrameSize | None:
    """SIZ (and COD) of a JPEG 2000 codestream; ``None`` when the frame has no SIZ."""
    cs = _j2k_codestream(frame)
    if cs is None or cs[2:4] != SIZ or len(cs) < 4 + 38 + 3:
        return None
    _length, _rsiz, xsiz, ysiz, xosiz, yosiz, *_tiles, csiz = struct.unpack(
        ">HHIIIIIIIIH", cs[4:42]
    )
    ssiz = cs[42]
    levels = None
    cod = cs.find(b"\xff\x52", 42)
    if cod > 0 and len(cs) > cod + 9:
        levels = cs[cod + 9]
    return FrameSize(
        width=max(xsiz - xosiz, 0),
        height=max(ysiz - yosiz, 0),
        components=csiz,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        levels=levels,
    )


def _jpeg_segments(frame: bytes) -> list[tuple[int, int, int]]:
    """``(marker, start of its payload, payload length)`` up to and including the first SOS."""
    out: list[tuple[int, int, int]] = []
    pos = 2  # after SOI
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            break
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack(">H", frame[pos + 2 : pos + 4])
        if length < 2:
            break
        out.append((marker, pos + 4, length - 2))
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
        pos += 2 + length
    return out


def jpeg_frame_size(frame: bytes) -> FrameSize | None:
    """SOF of a JPEG / JPEG-LS frame; ``None`` when none is found before the first scan."""
    if not frame.startswith(b"\xff\xd8"):
        return None
    for marker, start, length in _jpeg_segments(frame):
        if marker in _SOF_MARKERS and length >= 6:
            precision, height, width, components = struct.unpack(">BHHB", frame[start : start + 6])
            return FrameSize(width, height, components, precision, sof=marker)
    return None


def patch_jpeg_scan_end(frame: bytes) -> bytes | None:
    """A copy of a sequential DCT frame with every scan's Se set to 63, or ``None``.

    ``None`` when nothing needs patching: not sequential DCT (lossless JPEG uses Ss/Se
    for its predictor; progressive JPEG for spectral bands), or every scan already says 63.
    Only scan headers before the first entropy-coded segment are visited (a sequential
    frame with one interleaved scan, as DICOM writes them, has exactly one).
    """
    segments = _jpeg_segments(frame)
    sofs = [m for m, _, _ in segments if m in _SOF_MARKERS]
    if not sofs or sofs[0] not in _SEQUENTIAL_DCT:
        return None
    patched = bytearray(frame)
    changed = False
    for marker, start, length in segments:
        if marker != 0xDA or length < 1:
            continue
        ns = frame[start]
        se_at = start + 1 + 2 * ns + 1  # Ns, Ns x (Cs, Td/Ta), Ss, Se, Ah/Al
        if se_at < start + length and frame[se_at] == 0:
            patched[se_at] = 63
            changed = True
    return bytes(patched) if changed else None
