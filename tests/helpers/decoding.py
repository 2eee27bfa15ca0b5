"""A decode function for :class:`xrwatch.serve.decoders.Decoders`' worker processes that ends
its process (SIGKILL, as a decoder crash or the OOM killer would) on bytes that begin with
``DIE``, and decodes every other file as the daemon's workers do. Importable by the workers
(``tests.helpers`` is on the fork server's path), unlike a function defined in a test."""

from __future__ import annotations

import os
import signal
from typing import Any

from xrwatch.serve.decoders import decode_in_worker

KILLER = b"DIE"


def decode_or_die(path: str, spec: Any, data: bytes, level: int, budget: int) -> Any:
    if data.startswith(KILLER):
        os.kill(os.getpid(), signal.SIGKILL)
    return decode_in_worker(path, spec, data, level, budget)
