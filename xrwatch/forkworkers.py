"""Worker processes for the daemon, all forked from one fork server.

Two parts of the daemon run their CPU work in processes of their own, so that the daemon's
threads (pynetdicom's reception above all) never wait for the interpreter lock that work
holds: the SR builder (:mod:`xrwatch.dicom.builder`) and, with a DICOM port, the decoders
(:mod:`xrwatch.serve.decoders`). Both make their pools here (:func:`pool`) and start a
worker ahead of its first job with :func:`launch`, which does not wait for it.

multiprocessing has one fork server per process, started by the first pool that needs it,
with the modules to import once (:data:`PRELOAD`) fixed at that moment: the list is
therefore one list, for every kind of worker. The fork server is started from the daemon's
main process by a fresh interpreter, so it runs no threads and forking from it is safe.

Each worker (:func:`worker_start`) ignores SIGINT/SIGTERM (the daemon decides when it
ends), dies with the fork server, which ends when the daemon does (kill -9 included), and
may run at a lower priority than the daemon (a niceness): the SR builder does, so that
building results never slows receiving and classifying the next images.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
from multiprocessing import forkserver

# imported once by the fork server, before any worker is forked from it: the SR builder and
# the decoders with what they import only when they work (highdicom alone is a fifth of a
# second; the image readers are imported by the first decode)
PRELOAD = (
    "xrwatch.dicom.builder",
    "xrwatch.dicom.sr",
    "xrwatch.dicom.sc",
    "xrwatch.serve.decoders",
    "xrwatch.imageio",
)
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for this process when its parent ends


def worker_start(niceness: int) -> None:
    """In a worker: the daemon ends it (not a signal to its process group), and it ends
    with its parent, the fork server, which ends with the daemon; it runs ``niceness``
    below the daemon's priority."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if niceness:
        with contextlib.suppress(OSError):  # a seccomp filter may refuse: then at the default
            os.nice(niceness)
    # multiprocessing hands each child the daemon's end of the pipe whose closing tells the
    # fork server that the daemon is gone (so that a child could start children of its
    # own); held here, a daemon killed with -9 would leave server and worker running
    alive = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive is not None:
        with contextlib.suppress(OSError):
            os.close(alive)
        forkserver._forkserver._forkserver_alive_fd = None  # type: ignore[attr-defined]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker ends when its queue closes
        pass


def pool(workers: int = 1, niceness: int = 0) -> cf.ProcessPoolExecutor:
    """A pool of ``workers`` processes from the fork server (started now if need be),
    ``niceness`` below the daemon's priority. Raises OSError or ValueError when no process
    can be started."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return cf.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=worker_start, initargs=(niceness,)
    )


def launch(pool: cf.ProcessPoolExecutor) -> cf.Future[int]:
    """Start ``pool``'s worker without waiting for it: the worker's pid once it runs. The
    first ``submit`` to a pool starts its process and waits for the fork server (its
    imports: 0.75-1.1 s the first time on 2 cores, ``benchmarks/decode.py --worker-memory``), so
    it is made from a thread of its own; a failure to start is the future's exception."""
    started: cf.Future[int] = cf.Future()

    def run() -> None:
        try:
            pid = pool.submit(os.getpid).result()
        except BaseException as exc:  # reported to whoever waits for it
            started.set_exception(exc)
        else:
            started.set_result(pid)

    threading.Thread(target=run, name="xrwatch-worker-start", daemon=True).start()
    return started
