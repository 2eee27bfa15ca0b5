"""Format detection from the bytes, never from the extension."""

from __future__ import annotations

import logging
from pathlib import Path

from xrwatch.errors import ImageDecodeError, UnsupportedImageError
from xrwatch.imageio.types import ImageKind

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


def _looks_like_preambleless_dicom(head: bytes) -> bool:
    """A DICOM written without preamble starts with a group 0002 or 0008 element tag.

    Little endian (explicit or implicit VR) or explicit VR big endian (old files).
    """
    if len(head) < 8:
        return False
    vr = head[4:6]
    explicit = vr.isalpha() and vr.isupper()
    if int.from_bytes(head[0:2], "little") in (0x0002, 0x0008):
        if explicit:
            return True
        length = int.from_bytes(head[4:8], "little")  # implicit VR: a plausible length
        return length < 1 << 20
    return int.from_bytes(head[0:2], "big") == 0x0008 and explicit


HEAD_BYTES = 132  # enough for the DICOM preamble and its ``DICM`` marker


def sniff_format(path: str | Path, head: bytes | None = None) -> ImageKind:
    """Return ``"dicom"``, ``"png"`` or ``"jpeg"``, or raise :class:`UnsupportedImageError`.

    ``head``: the file's first bytes when the caller already holds them (then ``path`` is
    not read, only named in errors).
    """
    p = Path(path)
    if head is None:
        head = _read_head(p)
    else:
        head = head[:HEAD_BYTES]
    if not head:
        raise UnsupportedImageError(p, "empty file (0 bytes)")
    if len(head) >= HEAD_BYTES and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_SIGNATURE):
        return "jpeg"
    if _looks_like_preambleless_dicom(head):
        return "dicom"
    return_kind = "text" if _is_text(head) else "binary data"
    raise UnsupportedImageError(
        p, f"not a DICOM, PNG or JPEG file (found {return_kind}; formats are detected from content)"
    )


def _read_head(p: Path) -> bytes:
    try:
        with p.open("rb") as fh:
            return fh.read(HEAD_BYTES)
    except FileNotFoundError:
        raise ImageDecodeError(p, "file not found") from None
    except IsADirectoryError:
        raise UnsupportedImageError(p, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageDecodeError(p, "permission denied: the file is not readable") from None
    except OSError as exc:
        raise ImageDecodeError(p, f"cannot be read: {exc.strerror or exc}") from None


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
