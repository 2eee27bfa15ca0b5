"""Decode functions for :class:`xrwatch.serve.decoders.Decoders`' worker processes that
misbehave on purpose, and decode every other file as the daemon's workers do. Importable by
the workers (``tests.helpers`` is on the fork server's path), unlike a function defined in
a test.

- bytes that begin with ``DIE``: the worker ends (SIGKILL, as a decoder crash or the OOM
  killer would);
- bytes that begin with ``ODD``: the decode raises an exception that pickles but cannot be
  rebuilt (its ``__init__`` takes two arguments), as a library's own error may.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import xrwatch.serve.decoders as decoders

KILLER = b"DIE"
ODD = b"ODD"


class TwoPartError(Exception):
    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first} and {second}")


def _odd(path: Any, spec: Any, data: bytes) -> Any:
    raise TwoPartError("a library's own error", "two arguments")


def decode_or_die(path: str, spec: Any, data: bytes, level: int) -> Any:
    if data.startswith(KILLER):
        os.kill(os.getpid(), signal.SIGKILL)
    if data.startswith(ODD):
        real = decoders.load_model_input
        decoders.load_model_input = _odd  # in this worker process only
        try:
            return decoders.decode_in_worker(path, spec, data, level)
        finally:
            decoders.load_model_input = real
    return decoders.decode_in_worker(path, spec, data, level)
