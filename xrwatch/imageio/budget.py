"""A process-wide bound on the memory that concurrent image decodes may hold at once.

Each worker thread asks for an estimate of what its decode will allocate before it
decodes; when the sum over running decodes would pass the budget, it waits until others
finish. A single decode larger than the whole budget still runs, but alone. Ordinary
chest X-rays (<= ~20 MP, ~0.2 GiB each) never wait; two 100 MP images do not decode at
once under the default budget.

The budget is ``XRWATCH_DECODE_MEMORY_MB`` (MiB) from the environment, default 1536;
``set_decode_budget`` changes it at run time (tests, embedding applications).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_MB = 1536
ENV_VAR = "XRWATCH_DECODE_MEMORY_MB"
# What a grayscale decode holds at its peak, per pixel: the decoded samples (up to 4 bytes
# for 32-bit data, 6 for 16-bit RGB), the float32 result and one float32 intermediate.
BYTES_PER_PIXEL_OVERHEAD = 8


def _budget_from_env() -> int:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_BUDGET_MB << 20
    try:
        mb = int(raw)
    except ValueError:
        logger.warning(
            "%s=%r is not a whole number of MiB; using %d", ENV_VAR, raw, DEFAULT_BUDGET_MB
        )
        return DEFAULT_BUDGET_MB << 20
    return max(mb, 1) << 20


class DecodeBudget:
    """Bytes that running decodes may hold together; ``reserve`` waits for room."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._in_use = 0
        self._running = 0
        self._cond = threading.Condition()

    @property
    def limit_bytes(self) -> int:
        return self._limit

    @property
    def in_use_bytes(self) -> int:
        with self._cond:
            return self._in_use

    def set_limit(self, limit_bytes: int) -> None:
        with self._cond:
            self._limit = max(int(limit_bytes), 1)
            self._cond.notify_all()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the body; wait while it would overflow.

        A request larger than the whole budget waits until nothing else runs.
        """
        nbytes = max(int(nbytes), 0)
        with self._cond:
            waited = False
            while self._running and self._in_use + nbytes > self._limit:
                if not waited:
                    logger.debug(
                        "decode of %.0f MiB waits: %.0f of %.0f MiB in use",
                        nbytes / 2**20,
                        self._in_use / 2**20,
                        self._limit / 2**20,
                    )
                    waited = True
                self._cond.wait()
            self._in_use += nbytes
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= nbytes
                self._running -= 1
                self._cond.notify_all()


DECODE_BUDGET = DecodeBudget(_budget_from_env())


def set_decode_budget(limit_bytes: int) -> None:
    """Change the process-wide decode budget (bytes)."""
    DECODE_BUDGET.set_limit(limit_bytes)


def estimate_decode_bytes(pixels: int, bytes_per_sample: int, samples: int = 1) -> int:
    """What decoding ``pixels`` pixels will hold at its peak (see the module docstring)."""
    return pixels * (max(bytes_per_sample, 1) * max(samples, 1) + BYTES_PER_PIXEL_OVERHEAD)
