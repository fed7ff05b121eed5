"""Connections between TCP accept and a complete A-ASSOCIATE-RQ: bounded, timed out, cheap.

A connection that has not asked for an association yet costs one entry here and no thread:
one lobby thread waits on all of them with ``select``. A connection leaves the lobby

- **promoted**, once its whole A-ASSOCIATE-RQ PDU has arrived (after the TLS handshake on a
  TLS port): the bytes read so far go with it to the association
  (:mod:`dicomai.ingest.pdu_reader` reads them first), and only then does it get threads and
  count against ``max_associations``;
- **timed out**, when the request is not complete within the association set-up timeout
  (``acse_timeout_seconds``, the ARTIM timer of PS3.8 9.1.5);
- **evicted**, when the lobby is full: at most ``max_pending_connections`` in total and
  ``max_pending_per_address`` per peer address wait at once; a new connection pushes out the
  oldest one (of its address, when that address is at its cap). A legitimate peer sends its
  request within milliseconds of connecting, so a flood of silent or half-open connections
  cannot lock it out, and the flood's connections are closed;
- **refused**, when the first bytes are not an A-ASSOCIATE-RQ (an A-ABORT is sent, as an
  association acceptor in state Sta2 does) or the request is larger than
  :data:`MAX_REQUEST` bytes, or when the peer closes or the TLS handshake fails.

Drops are counted per reason (:attr:`Lobby.dropped`) and logged as a summary at most every
:data:`SUMMARY_EVERY` seconds, so a port scanner does not flood the log.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicomai import metrics
from dicomai.logs import log_fields

__all__ = ["MAX_REQUEST", "SUMMARY_EVERY", "Lobby", "LobbyLimits", "a_abort", "a_associate_rj"]

logger = logging.getLogger(__name__)

#: Largest A-ASSOCIATE-RQ accepted, header included (a storescu request with ~120
#: presentation contexts is about 14 KiB).
MAX_REQUEST = 1 << 20
#: Seconds between two log summaries of dropped connections.
SUMMARY_EVERY = 10.0
_A_ASSOCIATE_RQ = 0x01
_READ_CHUNK = 1 << 16
#: Longest wait of the lobby thread (housekeeping runs at least this often).
_TICK = 1.0


def a_abort(source: int = 2, reason: int = 0) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8): ``source`` 2 is the service provider."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, source, reason)


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, reason)


@dataclass(frozen=True)
class LobbyLimits:
    """How many connections may wait, and for how long."""

    setup_timeout: float
    max_pending: int
    max_pending_per_address: int


@dataclass(eq=False)
class _Pending:
    sock: Any
    address: tuple[Any, ...]
    deadline: float
    handshaking: bool
    buf: bytearray = field(default_factory=bytearray)

    @property
    def host(self) -> str:
        return str(self.address[0])


class Lobby:
    """Holds connections until their A-ASSOCIATE-RQ is complete, then calls ``promote(sock,
    address, prefix)`` on the lobby thread (``sock`` blocking, ``prefix`` the bytes read).

    ``tick`` (optional) is called on the lobby thread about once a second.
    """

    def __init__(
        self,
        limits: LobbyLimits,
        *,
        ssl_context: ssl.SSLContext | None,
        promote: Callable[[Any, tuple[Any, ...], bytes], None],
        tick: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.ssl_context = ssl_context
        self.promote = promote
        self.tick = tick
        self.clock = clock
        #: Connections dropped before associating, by reason.
        self.dropped: Counter[str] = Counter()
        #: Connections promoted to associations.
        self.promoted = 0
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._incoming: list[tuple[socket.socket, tuple[Any, ...]]] = []
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: Counter[str] = Counter()
        self._last_summary = 0.0

    # -- public ------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Connections in the lobby now."""
        return len(self._pending)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="receiver-lobby", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close every waiting connection."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for sock, _ in incoming:
            _close(sock)
        for entry in list(self._pending.values()):
            _close(entry.sock)
        self._pending.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def admit(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        """Take a freshly accepted connection (from the accept thread)."""
        if self._stop.is_set():
            _close(sock)
            return
        with self._lock:
            self._incoming.append((sock, address))
        self._wake()

    # -- the lobby thread --------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"!")
        except OSError:  # full or closed: a wake-up is pending anyway
            pass

    def _run(self) -> None:
        next_tick = self.clock() + _TICK
        while not self._stop.is_set():
            now = self.clock()
            nearest = min((e.deadline for e in self._pending.values()), default=now + _TICK)
            wait = max(0.0, min(nearest, next_tick) - now)
            try:
                events = self._selector.select(wait)
            except OSError:
                events = []
            for key, mask in events:
                if key.data is None:
                    self._drain_wake()
                else:
                    self._on_ready(key.data, mask)
            self._take_incoming()
            self._expire()
            if self.clock() >= next_tick:
                next_tick = self.clock() + _TICK
                self._housekeeping()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for sock, address in incoming:
            self._add(sock, address)

    def _add(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        host = str(address[0])
        limits = self.limits
        same = [e for e in self._pending.values() if e.host == host]
        if len(same) >= limits.max_pending_per_address:
            self._drop(same[0], "evicted")
        if len(self._pending) >= limits.max_pending:
            self._drop(next(iter(self._pending.values())), "evicted")
        try:
            sock.setblocking(False)
            conn: Any = sock
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
        except (OSError, ValueError):
            _close(sock)
            self.dropped["closed"] += 1
            return
        entry = _Pending(
            conn,
            address,
            self.clock() + limits.setup_timeout,
            handshaking=self.ssl_context is not None,
        )
        self._pending[id(entry)] = entry
        try:
            self._selector.register(conn, selectors.EVENT_READ, entry)
        except (OSError, ValueError):
            self._drop(entry, "closed")
            return
        if entry.handshaking:
            self._on_ready(entry, selectors.EVENT_READ)  # a handshake may need to write first

    def _on_ready(self, entry: _Pending, mask: int) -> None:
        if id(entry) not in self._pending:
            return
        if entry.handshaking:
            try:
                entry.sock.do_handshake()
            except ssl.SSLWantReadError:
                self._watch(entry, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._watch(entry, selectors.EVENT_WRITE)
                return
            except (OSError, ValueError) as exc:
                logger.warning(
                    "TLS handshake failed",
                    extra=log_fields(
                        "association.tls_failed", peer=entry.host, error=type(exc).__name__
                    ),
                )
                self._drop(entry, "tls_failed")
                return
            entry.handshaking = False
            self._watch(entry, selectors.EVENT_READ)
        self._read(entry)

    def _watch(self, entry: _Pending, events: int) -> None:
        try:
            self._selector.modify(entry.sock, events, entry)
        except (OSError, ValueError, KeyError):
            self._drop(entry, "closed")

    def _read(self, entry: _Pending) -> None:
        while True:
            try:
                data = entry.sock.recv(_READ_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (OSError, ValueError):
                self._drop(entry, "closed")
                return
            if not data:
                self._drop(entry, "closed")
                return
            entry.buf += data
            if len(entry.buf) >= 6:
                pdu_type, _, length = struct.unpack_from(">BBL", entry.buf)
                if pdu_type != _A_ASSOCIATE_RQ:
                    self._send_quietly(entry, a_abort())
                    self._drop(entry, "not_association")
                    return
                if 6 + length > MAX_REQUEST:
                    self._send_quietly(entry, a_abort())
                    self._drop(entry, "request_too_large")
                    return
                if len(entry.buf) >= 6 + length:
                    self._promote(entry)
                    return

    def _promote(self, entry: _Pending) -> None:
        self._forget(entry)
        sock = entry.sock
        try:
            sock.setblocking(True)
        except OSError:
            _close(sock)
            self.dropped["closed"] += 1
            return
        self.promoted += 1
        try:
            self.promote(sock, entry.address, bytes(entry.buf))
        except Exception:
            logger.exception(
                "could not start an association",
                extra=log_fields("association.start_failed", peer=entry.host),
            )
            _close(sock)

    def _expire(self) -> None:
        now = self.clock()
        for entry in [e for e in self._pending.values() if e.deadline <= now]:
            self._drop(entry, "timeout")

    def _forget(self, entry: _Pending) -> None:
        self._pending.pop(id(entry), None)
        try:
            self._selector.unregister(entry.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, entry: _Pending, reason: str) -> None:
        self._forget(entry)
        _close(entry.sock)
        self.dropped[reason] += 1
        metrics.observe_connection_dropped(reason)
        logger.debug(
            "connection dropped before associating",
            extra=log_fields("association.dropped", peer=entry.host, reason=reason),
        )

    @staticmethod
    def _send_quietly(entry: _Pending, pdu: bytes) -> None:
        try:
            entry.sock.send(pdu)
        except (OSError, ValueError):
            pass

    def _housekeeping(self) -> None:
        now = self.clock()
        if now - self._last_summary >= SUMMARY_EVERY:
            new = self.dropped - self._reported
            if new:
                self._reported = self.dropped.copy()
                self._last_summary = now
                logger.warning(
                    "connections dropped before associating",
                    extra=log_fields(
                        "association.dropped_summary", waiting=len(self._pending), **dict(new)
                    ),
                )
        if self.tick is not None:
            try:
                self.tick()
            except Exception:
                logger.exception(
                    "receiver housekeeping failed", extra=log_fields("receiver.housekeeping_failed")
                )


def _close(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass
    try:
        sock.close()
    except (OSError, ValueError):
        pass
