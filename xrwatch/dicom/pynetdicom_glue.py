"""What the receiver changes in pynetdicom, in one place.

- :func:`stream_to_spool`: while a receiver runs, C-STORE data sets stream to disk
  (``_config.STORE_RECV_CHUNKED_DATASET``) and, for a receiver's own associations, into a
  :class:`xrwatch.dicom.spool.PartFile` in its spool (pynetdicom's temporary file
  factory is replaced: its own would land in ``/tmp``, a tmpfs that counts as memory);
  other pynetdicom servers in the process get pynetdicom's own temporary files.
- :class:`Quiet`: pynetdicom's ERROR lines and tracebacks about hostile peers go to DEBUG
  (the gate and the receiver log one line per connection instead).
- :class:`SharedUIDContexts`: the server's presentation contexts, copied for each
  association without re-validating every UID (pynetdicom deep-copies them per association).
- :func:`tls_context`, :func:`decodable_transfer_syntaxes`.
"""

from __future__ import annotations

import copy
import logging
import ssl
import threading
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages

from xrwatch.errors import ConfigError


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data the installed pydicom plugins decode."""
    from pydicom.pixels import get_decoder
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS

    return [str(uid) for uid in _PIXEL_DATA_DECODERS if get_decoder(uid).is_available]


def tls_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """The receiver's TLS context (TLS 1.2 or later); with ``ca``, senders need a
    certificate signed by it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca is not None:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"dicom_tls_cert {cert} / dicom_tls_key {key}"
            + (f" / dicom_tls_ca {ca}" if ca else "")
            + f": cannot be loaded ({getattr(exc, 'reason', None) or exc})"
        ) from None
    return ctx


class SharedUIDContexts(list):
    """The server's presentation contexts, cheap to deep-copy.

    pynetdicom gives each association ``deepcopy(server.contexts)``
    (``RequestHandler._create_association``). A whole-study node accepts every storage SOP
    class (170) with every decodable transfer syntax (16); deep-copying rebuilds each of
    those 2,900 UIDs through pydicom's validating constructor: about 40 CPU ms per
    association on these 2 cores, the whole cost of one instance sent per association.
    UIDs are immutable ``str``: this copy makes new context objects and new lists, and
    shares the UIDs (``benchmarks/dicom_contexts.py``: 40 -> 1 CPU ms per association).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        out = []
        for cx in self:
            new = copy.copy(cx)
            for name, value in vars(cx).items():
                if isinstance(value, list):
                    setattr(new, name, list(value))
            out.append(new)
        return out


class Quiet(logging.Filter):
    """pynetdicom logs a hostile peer as ERROR lines with tracebacks; the gate and the
    receiver log one line per connection instead, so pynetdicom's go to DEBUG, bare."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.CRITICAL:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info, record.exc_text = None, None
        return True


def quiet_pynetdicom() -> None:
    """Put :class:`Quiet` on every pynetdicom logger (a filter on a parent logger does
    not see its children's records)."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "pynetdicom"]
    for name in ["pynetdicom", *names]:
        log = logging.getLogger(name)
        if not any(isinstance(f, Quiet) for f in log.filters):
            log.addFilter(Quiet())


_original_temporary_file = dimse_messages.NamedTemporaryFile
_streaming = [0]  # receivers running in this process (pynetdicom's switches are global)
_streaming_lock = threading.Lock()


def stream_to_spool(on: bool) -> None:
    """Data sets stream to disk (``STORE_RECV_CHUNKED_DATASET``), into a :class:`PartFile`
    for our server's associations, while any receiver runs; pynetdicom's defaults after."""
    with _streaming_lock:
        _streaming[0] += 1 if on else -1
        active = _streaming[0] > 0
        _config.STORE_RECV_CHUNKED_DATASET = active
        dimse_messages.NamedTemporaryFile = _part_file if active else _original_temporary_file


def _part_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's temporary file for a C-STORE data set (``STORE_RECV_CHUNKED_DATASET``):
    for our server's associations, a :class:`PartFile` in the spool."""
    assoc = getattr(threading.current_thread(), "assoc", None)  # the association's DUL
    receiver = getattr(getattr(assoc, "_server", None), "receiver", None)
    if receiver is None:  # another pynetdicom server in this process
        return _original_temporary_file(*args, **kwargs)
    return receiver.new_part(assoc)


class Refused:
    """Where a data set goes when the spool cannot be used: nowhere (its ``name`` names
    no file, so pynetdicom's clean-up removes nothing)."""

    name = ""
    over = committed = False

    def __init__(self, why: str) -> None:
        self.why = why
        self.file = self

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...
