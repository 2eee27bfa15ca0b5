"""pynetdicom's reactors, for the receiver's associations, wait for what they poll for.

pynetdicom gives each association two threads that poll: the DUL thread checks its socket
and its queues, then sleeps a millisecond (``DULServiceProvider._run_loop_delay``; its own
comment asks for it to be made event based); the association
thread checks for a decoded DIMSE message, a release or an abort, then sleeps a millisecond
(``Association._run_reactor``). Two thousand wake-ups a second per association, each taking
the interpreter lock: three idle associations held 22 % of a core of the daemon, 3.4 % with
these waits (AMD EPYC, 2 logical CPUs; ``benchmarks/dicom_latency.py``), and during a burst the
polling competes with the model for the same cores.

Here each such millisecond sleep, on the receiver's associations only, becomes a wait that
ends as soon as there is something to do:

- the DUL thread waits on its socket (a PDU arriving) and on a pipe written whenever
  another thread queues a primitive for it to send (``to_provider_queue``, e.g. the
  C-STORE response);
- the association thread waits on an event set whenever the DUL thread queues something for
  it (``dimse.msg_queue``: a complete message; ``to_user_queue``: a release or an abort).

What only polling notices (a kill flag, a timer, the other thread's end) is still seen,
within :data:`LONGEST_WAIT`. pynetdicom is not changed otherwise: the same loops run, the
same checks in the same order; if its code no longer looks as expected, nothing is attached
and it polls as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import ssl
import sys
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

POLL = 0.001  # the sleep both reactors poll with (pynetdicom 2.x and 3.0)
LONGEST_WAIT = 0.05  # seconds a reactor waits when nothing wakes it
_ATTR = "_xrwatch_waits"


class Waits:
    """What wakes one association's two threads."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self.wakeups = 0  # reactor waits that ended (tests count them)
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._fds_lock = threading.Lock()  # no write or read into a number reused after close
        self.closed = False
        self._ready = threading.Event()
        _after_put(assoc.dul.to_provider_queue, self.wake_dul)
        _after_put(assoc.dul.to_user_queue, self._ready.set)
        _after_put(assoc.dimse.msg_queue, self._ready.set)
        setattr(assoc.dul, _ATTR, self)
        setattr(assoc, _ATTR, self)

    def wake_dul(self) -> None:
        with self._fds_lock:
            if not self.closed:
                with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                    os.write(self._write, b"x")

    def dul_wait(self) -> None:
        """Until a PDU arrives, a primitive is queued to send, or :data:`LONGEST_WAIT`."""
        self.wakeups += 1
        sock = getattr(self.assoc.dul.socket, "socket", None)
        with self._fds_lock:
            pipe = -1 if self.closed else self._read
        try:
            if sock is None or sock.fileno() < 0 or pipe < 0:
                raise ValueError("no socket")
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes wait in the TLS layer: select would not see them
            ready, _, _ = select.select([sock, pipe], [], [], LONGEST_WAIT)
        except (OSError, ValueError):  # closed meanwhile (or a number >= 1024): poll
            time.sleep(POLL)
            return
        if pipe in ready:
            with self._fds_lock, contextlib.suppress(OSError):
                if not self.closed:
                    os.read(self._read, 4096)

    def assoc_wait(self) -> None:
        """Until the DUL thread queues a message, a release or an abort, or
        :data:`LONGEST_WAIT`. Cleared before the reactor's checks, so a put after them sets
        it again and the next wait ends at once; the reactor takes one message per pass,
        so a second one already queued ends the wait at once too."""
        self.wakeups += 1
        self._ready.clear()
        if self.assoc.dimse.msg_queue.qsize():
            return
        self._ready.wait(LONGEST_WAIT)

    def close(self) -> None:
        """Give the pipe back (the association ended); its threads, if one still runs,
        poll as pynetdicom does."""
        with self._fds_lock:
            if self.closed:
                return
            self.closed = True
            for fd in (self._read, self._write):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _after_put(q: Any, wake: Any) -> None:
    put = q.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    q.put = put_and_wake  # put_nowait calls self.put: covered too


class _Clock:
    """Stands in for the ``time`` module inside pynetdicom's ``dul`` and ``association``
    modules: the reactors' millisecond sleep, on a thread with :class:`Waits`, becomes its
    wait; everything else is ``time`` itself."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        waits = getattr(thread, _ATTR, None)
        # only the two reactor loops' sleep (not, e.g., stop_dul's, on the same thread)
        if waits is None or seconds != POLL or sys._getframe(1).f_code not in _LOOPS:
            self._real.sleep(seconds)
        elif thread is waits.assoc:
            waits.assoc_wait()
        else:
            waits.dul_wait()


_lock = threading.Lock()
_installed: bool | None = None  # None: not tried yet
_LOOPS: set[Any] = set()  # the code of the two reactor loops whose sleep becomes a wait


def _install() -> bool:
    """Put :class:`_Clock` into pynetdicom once; False where its code is not as expected."""
    global _installed
    with _lock:
        if _installed is None:
            from pynetdicom import association, dul

            expected = (
                all(
                    getattr(m, "time", None) is time or isinstance(getattr(m, "time", None), _Clock)
                    for m in (association, dul)
                )
                and "_run_loop_delay" in dul.DULServiceProvider.__init__.__code__.co_names
            )
            if expected:
                _LOOPS.update(
                    (
                        dul.DULServiceProvider.run_reactor.__code__,
                        association.Association._run_reactor.__code__,
                    )
                )
                association.time = dul.time = _Clock(time)  # type: ignore[assignment]
            else:
                logger.debug("pynetdicom's reactors are not as expected: they poll as before")
            _installed = expected
        return _installed


def attach(assoc: Any) -> Waits | None:
    """Give a new association (before its threads start: at ``EVT_CONN_OPEN``) its waits;
    None where pynetdicom is not as expected or no pipe can be made (it polls then).
    :func:`release` once its threads have ended."""
    if not _install() or getattr(assoc.dul, "_run_loop_delay", None) != POLL:
        return None
    try:
        return Waits(assoc)
    except OSError as exc:  # e.g. out of file descriptors
        logger.debug("association polls: no pipe for its waits (%s)", exc)
        return None


def release(assoc: Any) -> None:
    """Close an ended association's pipe (each association holds two descriptors until
    then; the cycle collector would free them only much later)."""
    waits = getattr(assoc, _ATTR, None)
    if waits is not None:
        waits.close()
