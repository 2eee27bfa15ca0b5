"""The receiver's front door: no peer can hold it, whatever it sends or fails to send.

pynetdicom gives every TCP connection two threads at once, and a thread blocked reading a
PDU the peer never finishes cannot be stopped: ten connections that sent half an
A-ASSOCIATE-RQ held every slot until they hung up, and SIGTERM waited for them. So:

- **The gate.** A new connection is not handed to pynetdicom until its whole
  A-ASSOCIATE-RQ is in the socket's receive buffer (peeked, not read; over TLS: once the
  handshake is done). One thread watches every such connection (epoll, edge-triggered)
  under an absolute deadline (``acse_timeout`` from the TCP accept), and closes, with one
  log line each, a connection that sends anything but an association request, one larger
  than :data:`MAX_REQUEST`, or one not complete in time. Connections waiting there use
  no association slot; past :data:`MAX_WAITING` (or :data:`MAX_WAITING_PER_HOST` from one
  address) the oldest is closed, so a new sender always gets its turn.
- **The reaper.** An association handed over must be established within
  ``acse_timeout`` of the accept and then receive a complete PDU at least every
  ``network_timeout`` seconds (a trickle does not count: the clock restarts per PDU, not
  per byte); a PDU longer than the negotiated maximum ends it before it is read. Ending
  one means shutting its socket down, which wakes the thread blocked on it.
- **Stop.** Every connection is shut down and the threads get :data:`STOP_GRACE` seconds;
  what is still alive then is told to exit. SIGTERM never waits for a peer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from xrwatch.dicom import reactor_waits
from xrwatch.dicom.settings import ReceiverLimits

logger = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # bytes an A-ASSOCIATE-RQ may have (real ones: under 4 KiB)
MAX_WAITING = 256  # connections waiting at the gate at once; more: the oldest is closed
MAX_WAITING_PER_HOST = 64  # the same, per source address
STOP_GRACE = 5.0  # seconds the association threads get to end at stop
KILL_GRACE = 5.0  # seconds an association shut down gets before it is told to exit
TICK = 0.25  # seconds between checks of the deadlines
LISTEN_BACKLOG = 128  # pending TCP connections the kernel queues (capped by net.core.somaxconn)
A_ASSOCIATE_RQ = 0x01
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def _host(address: Any) -> str:
    return str(address[0]) if isinstance(address, tuple) else str(address)


def _who(address: Any) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


@dataclass
class _Waiting:
    sock: socket.socket
    address: Any
    accepted: float
    tls: bool
    handshaken: bool = False


@dataclass
class Peer:
    """One connection handed to pynetdicom, from accept to its thread's end."""

    assoc: Any
    sock: socket.socket
    address: Any
    accepted: float
    last_pdu: float
    calling_ae: str = ""
    established: float | None = None
    last_done: float | None = None  # a C-STORE or C-ECHO answered
    busy: int = 0  # handlers running
    killed: str | None = None  # why the gate ended it
    killed_at: float = 0.0
    parts: list[Any] = field(default_factory=list)  # PartFiles being received
    counts: dict[str, int] = field(default_factory=dict)
    ended: bool = False

    @property
    def host(self) -> str:
        return _host(self.address)

    def count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1


class Gate:
    """Connections from accept to the end of their association (see the module doc)."""

    def __init__(
        self,
        limits: ReceiverLimits,
        ssl_context: ssl.SSLContext | None,
        on_dropped: Callable[[], None] = lambda: None,
    ) -> None:
        self.limits = limits
        self.ssl_context = ssl_context
        self.on_dropped = on_dropped  # metrics: a connection closed before any association
        self.server: GatedServer | None = None
        self._epoll: Any = None  # the epoll and the wake-up pipe are made by start()
        self._wake_r = self._wake_w = -1
        self._new: list[_Waiting] = []
        self._waiting: dict[int, _Waiting] = {}  # fd -> connection, oldest first
        self._peers: dict[int, Peer] = {}  # id(assoc) -> peer
        self._accepted: dict[int, float] = {}  # id(socket) -> accept time, until handed over
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xrwatch-dicom-gate", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Close every connection and wait (at most :data:`STOP_GRACE` + a little) for the
        association threads; call after the server stopped accepting."""
        if self._epoll is None:
            return  # never started
        self._stopping.set()
        os.write(self._wake_w, b"x")
        self._thread.join()
        with self._lock:
            new, self._new = self._new, []
        for waiting in [*self._waiting.values(), *new]:
            self._close(waiting.sock)
        self._waiting.clear()
        with self._lock:
            peers = list(self._peers.values())
        for peer in peers:
            if peer.killed is None:
                self.kill(peer, "the daemon is stopping", level=logging.INFO)
        deadline = time.monotonic() + STOP_GRACE
        for peer in peers:
            peer.assoc.join(max(0.0, deadline - time.monotonic()))
        for peer in peers:
            if peer.assoc.is_alive():
                self._force_exit(peer)
        for peer in peers:
            peer.assoc.join(1.0)
            self._end(peer)
        self._stop_stray_threads()
        self._epoll.close()
        self._epoll = None
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _stop_stray_threads(self) -> None:
        """pynetdicom's DUL threads are not daemon threads: one still running would keep
        the process from exiting. Tell any of this server's to exit."""
        stray = [
            t
            for t in threading.enumerate()
            if hasattr(t, "_kill_thread")
            and getattr(getattr(t, "_assoc", None), "_server", None) is self.server
        ]
        for thread in stray:
            thread._kill_thread = True
            sock = getattr(getattr(thread, "socket", None), "socket", None)
            if sock is not None:
                self._close(sock)
        for thread in stray:
            thread.join(1.0)
            if thread.is_alive():
                logger.warning("DICOM receiver: thread %s did not stop", thread.name)

    # -- the server's side -------------------------------------------------------------
    def admit(self, sock: socket.socket, address: Any) -> None:
        """A new TCP connection (called on the server's thread)."""
        with self._lock:
            tls = self.ssl_context is not None
            self._new.append(_Waiting(sock, address, time.monotonic(), tls))
        os.write(self._wake_w, b"x")

    def accepted_at(self, sock: Any) -> float:
        with self._lock:
            return self._accepted.pop(id(sock), time.monotonic())

    # -- pynetdicom's events (association threads) -------------------------------------
    def opened(self, assoc: Any) -> Peer:
        sock = assoc.dul.socket.socket
        accepted = self.accepted_at(sock)
        address = (assoc.requestor.address, assoc.requestor.port)
        peer = Peer(assoc, sock, address, accepted, accepted)
        limit = max(self.limits.max_pdu, MAX_REQUEST)
        assoc_socket = assoc.dul.socket

        def guarded_recv(n: int) -> bytearray:
            # pynetdicom reads a PDU's length, then that many bytes into memory
            if n > limit:
                self.kill(peer, f"sent a PDU of {n} bytes, more than the maximum of {limit}")
                raise OSError(f"PDU of {n} bytes refused")
            return read_exactly(assoc_socket.socket, n)

        assoc_socket.recv = guarded_recv
        with self._lock:
            self._peers[id(assoc)] = peer
        reactor_waits.attach(assoc)  # its threads wait for work instead of polling
        return peer

    def peer(self, assoc: Any) -> Peer | None:
        with self._lock:
            return self._peers.get(id(assoc))

    def peers(self) -> list[Peer]:
        with self._lock:
            return [p for p in self._peers.values() if not p.ended]

    def kill(self, peer: Peer, why: str, level: int = logging.WARNING) -> None:
        """End ``peer``'s connection now: shut its socket down (its threads wake up)."""
        if peer.killed is not None:
            return
        peer.killed, peer.killed_at = why, time.monotonic()
        logger.log(
            level,
            "DICOM association from AE %r at %s ended: %s",
            peer.calling_ae or "?",
            _who(peer.address),
            why,
        )
        _abortive(peer.sock)
        with contextlib.suppress(OSError):
            socket.socket.shutdown(peer.sock, socket.SHUT_RDWR)

    # -- the gate's thread -------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                events = self._epoll.poll(TICK)
            except OSError:
                events = []
            for fd, _mask in events:
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                    continue
                waiting = self._waiting.get(fd)
                if waiting is not None:
                    self._advance(fd, waiting)
            self._take_new()
            now = time.monotonic()
            for fd, waiting in list(self._waiting.items()):
                if now - waiting.accepted > self.limits.acse_timeout:
                    what = (
                        "TLS handshake"
                        if waiting.tls and not waiting.handshaken
                        else ("association request")
                    )
                    self._drop(fd, f"no complete {what} within {self.limits.acse_timeout:g} s")
            self._reap(now)

    def _take_new(self) -> None:
        with self._lock:
            new, self._new = self._new, []
        for waiting in new:
            host = _host(waiting.address)
            same = [fd for fd, w in self._waiting.items() if _host(w.address) == host]
            if len(same) >= MAX_WAITING_PER_HOST:
                self._drop(
                    same[0],
                    f"more than {MAX_WAITING_PER_HOST} unfinished connections from this "
                    "address (the oldest is closed)",
                )
            elif len(self._waiting) >= MAX_WAITING:
                self._drop(
                    next(iter(self._waiting)),
                    f"more than {MAX_WAITING} unfinished connections (the oldest is closed)",
                )
            try:
                waiting.sock.setblocking(False)
                fd = waiting.sock.fileno()
                mask = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
                if waiting.tls:
                    mask |= select.EPOLLOUT
                self._epoll.register(fd, mask)
            except OSError:
                self._close(waiting.sock)
                continue
            self._waiting[fd] = waiting
            self._advance(fd, waiting)  # data may have arrived before the registration

    def _advance(self, fd: int, waiting: _Waiting) -> None:
        sock = waiting.sock
        if waiting.tls and not waiting.handshaken:
            assert isinstance(sock, ssl.SSLSocket)
            try:
                sock.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
                self._drop(fd, f"TLS handshake failed ({reason})")
                return
            waiting.handshaken = True
            self._hand_over(fd, waiting)  # the request itself is checked by pynetdicom
            return
        try:
            data = sock.recv(MAX_REQUEST, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(fd, f"connection failed ({exc.strerror or exc})")
            return
        if not data:
            self._drop(fd, "closed without sending an association request", logging.INFO)
        elif data[0] != A_ASSOCIATE_RQ:
            self._drop(fd, f"not a DICOM association request (first byte 0x{data[0]:02x})")
        elif len(data) >= 6:
            (length,) = struct.unpack(">L", data[2:6])
            if length > MAX_REQUEST - 6:
                self._drop(fd, f"association request of {length} bytes (at most {MAX_REQUEST})")
            elif len(data) >= 6 + length:
                self._hand_over(fd, waiting)

    def _hand_over(self, fd: int, waiting: _Waiting) -> None:
        del self._waiting[fd]
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        sock = waiting.sock
        try:
            sock.setblocking(True)
            sock.settimeout(self.limits.network_timeout)  # a backstop; the reaper decides
        except OSError:
            self._close(sock)
            return
        with self._lock:
            self._accepted[id(sock)] = waiting.accepted
        assert self.server is not None
        self.server.hand_over(sock, waiting.address)

    def _drop(self, fd: int, why: str, level: int = logging.WARNING) -> None:
        waiting = self._waiting.pop(fd, None)
        if waiting is None:
            return
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        logger.log(level, "DICOM connection from %s closed: %s", _who(waiting.address), why)
        self._close(waiting.sock)
        self.on_dropped()

    @staticmethod
    def _close(sock: socket.socket) -> None:
        _abortive(sock)
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    # -- the reaper --------------------------------------------------------------------
    def _reap(self, now: float) -> None:
        lim = self.limits
        for peer in self.peers():
            assoc = peer.assoc
            if assoc.ident is not None and not assoc.is_alive():
                self._end(peer)
            elif peer.killed is not None:
                if now - peer.killed_at > KILL_GRACE:
                    self._force_exit(peer)
            elif peer.established is None and now - peer.accepted > lim.acse_timeout:
                self.kill(peer, f"association not established within {lim.acse_timeout:g} s")
            elif peer.busy == 0 and now - peer.last_pdu > lim.network_timeout:
                self.kill(peer, f"no complete PDU for {lim.network_timeout:g} s (idle or slow)")

    def _force_exit(self, peer: Peer) -> None:
        """The thread did not end after its socket was shut down: tell it to exit."""
        assoc = peer.assoc
        assoc._kill = True
        assoc.dul._kill_thread = True
        assoc._reactor_checkpoint.set()
        self._close(peer.sock)

    def _end(self, peer: Peer) -> None:
        """The association's thread has ended: remove what it left, log its summary."""
        with self._lock:
            if peer.ended:
                return
            peer.ended = True
            self._peers.pop(id(peer.assoc), None)
        reactor_waits.release(peer.assoc)
        for part in peer.parts:
            part.discard()
        peer.parts.clear()
        if peer.established is not None:
            done = ", ".join(f"{n} {k}" for k, n in sorted(peer.counts.items())) or "nothing sent"
            logger.info(
                "DICOM association from AE %r at %s closed after %.1f s: %s",
                peer.calling_ae,
                _who(peer.address),
                time.monotonic() - peer.established,
                done,
            )


def read_exactly(sock: socket.socket, n: int) -> bytearray:
    """``n`` bytes from ``sock``, fewer only when the peer closed (as pynetdicom's
    ``AssociationSocket.recv``, whose place it takes). pynetdicom reads 4 KiB per call and
    extends a bytearray: 107 calls for an instance of 435 KB; this fills one buffer with
    ``recv_into``, as much as the kernel holds per call. Timeouts and errors propagate."""
    buf = bytearray(n)
    got = 0
    with memoryview(buf) as view:
        while got < n:
            k = sock.recv_into(view[got:], n - got)
            if not k:
                break
            got += k
    if got < n:
        del buf[got:]
    ack_now(sock)
    return buf


def ack_now(sock: socket.socket) -> None:
    """Acknowledge what was read at once instead of up to 40 ms later (Linux
    ``TCP_QUICKACK``; set again after every PDU, as the kernel leaves quick-ack mode by
    itself). A sender with Nagle's algorithm on, as DCMTK's ``storescu`` is by default,
    holds back each C-STORE's data PDU until its command PDU is acknowledged, and Linux
    delays that acknowledgement while it has nothing to send back: 48.5 ms per instance
    of 480 KiB on one association, 39.4 acknowledged at once; 31.0 and 17.4 to an idle
    daemon (``benchmarks/dicom_latency.py``)."""
    if _TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):  # not TCP (a socket pair), or already closed
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def _abortive(sock: socket.socket) -> None:
    """Make the socket's close a reset (SO_LINGER 0): a sender blocked writing into a
    window we no longer read learns at once, instead of after TCP's own timeouts (a
    refused 100 MiB send otherwise hung storescu for 108 s in CLOSE-WAIT)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class GatedServer(ThreadedAssociationServer):
    """pynetdicom's server, with each new connection passed through the :class:`Gate`."""

    # connections the kernel holds until accepted (socketserver's default, 5, dropped the
    # SYNs of a burst of connections: each such client waited for its 1 s SYN retry)
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, *args: Any, gate: Gate, **kwargs: Any) -> None:
        self.gate = gate
        gate.server = self
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        if self.gate.ssl_context is not None:  # the handshake happens at the gate
            sock = self.gate.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        self.gate.admit(request, client_address)

    def hand_over(self, sock: socket.socket, address: Any) -> None:
        """A connection through the gate: pynetdicom's usual thread per association."""
        try:
            super().process_request(sock, address)
        except Exception as exc:  # e.g. no thread can be started
            logger.error("DICOM connection from %s: cannot be served (%s)", _who(address), exc)
            Gate._close(sock)
