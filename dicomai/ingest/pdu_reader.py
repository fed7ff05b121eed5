"""Reading an association's PDUs with a deadline on every read.

pynetdicom's network thread (the DUL reactor) reads a PDU by blocking on the socket until all
the bytes its header announced have come: a peer that announces a large PDU and then stalls
holds that thread, the association and its resources forever, and the idle timer's abort
waits behind the same thread. :class:`PduReader` takes over the reading step of one accepted
association (:func:`dicomai.ingest.pynetdicom_seam.replace_read_step`):

- **Waiting** for the next PDU is a ``select`` on the socket and a wake-up pipe, bounded by
  :data:`WAIT` so the reactor still sees its timers and stop flag; the pipe is written when
  the association queues something to send, so a response leaves at once.
- **Reading** a PDU has a deadline: the association set-up timeout (ARTIM) until the
  association is established, the network timeout inside a PDU after. A peer that stalls
  inside a PDU is dropped when it passes (the connection is closed and pynetdicom's state
  machine told, so the association ends through its normal events).
- **Size caps**: a P-DATA-TF PDU may not exceed the Maximum Length Received we announced
  (PS3.8 D.1); an association PDU 1 MiB; the others (release, abort) 64 KiB. A larger one is
  an invalid PDU (A-ABORT) and is not read. The read buffer grows only as bytes arrive.
- **Dispatch**: a P-DATA-TF PDU is offered to the C-STORE fast path
  (:class:`dicomai.ingest.fast_store.FastStore`); anything it does not take is decoded by
  pynetdicom and queued for its state machine. A PDU that breaks the fast path's message is
  an invalid PDU: the state machine aborts the association, and its end events fire.
- Bytes read before the association existed (the A-ASSOCIATE-RQ the connection lobby read,
  :mod:`dicomai.ingest.lobby`) are read first.
- After every read ``TCP_QUICKACK`` is re-armed: a sender with Nagle's algorithm on waits
  for our ACK before it sends the rest of a small PDU, and Linux delays that ACK by up to
  40 ms unless asked again after each read.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from typing import Any, Protocol

from dicomai import metrics
from dicomai.ingest import pynetdicom_seam as seam
from dicomai.logs import log_fields

__all__ = ["MAX_ASSOCIATION_PDU", "MAX_OTHER_PDU", "RUN", "WAIT", "PduReader", "Waker"]

logger = logging.getLogger(__name__)

#: Longest wait for the next PDU in one reactor loop, in seconds.
WAIT = 0.05
#: Longest run of fast-path PDUs read in one read step, in seconds.
RUN = 0.5
#: Largest A-ASSOCIATE-RQ/AC/RJ PDU body accepted (bytes).
MAX_ASSOCIATION_PDU = 1 << 20
#: Largest A-RELEASE / A-ABORT PDU body accepted (their bodies are 4 bytes).
MAX_OTHER_PDU = 1 << 16
#: A read buffer starts at most this large and grows as bytes arrive.
_FIRST_BUFFER = 1 << 20
_P_DATA_TF = 0x04
_KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
_ESTABLISHED = frozenset({"Sta6", "Sta7", "Sta8", "Sta9", "Sta10", "Sta11", "Sta12"})
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class FastPath(Protocol):
    """The C-STORE fast path as the reader sees it."""

    def take(self, body: bytes | bytearray) -> bool:
        """Serve this P-DATA-TF PDU body (True) or leave it to pynetdicom (False); raises
        :class:`dicomai.ingest.fast_store.ProtocolError` when it breaks a message."""

    def reset(self) -> None:
        """Forget a message in progress (the PDU stream went elsewhere)."""


class _Stalled(Exception):
    """The peer did not send the rest of a PDU in time."""


class _Closed(Exception):
    """The connection closed or failed."""


def _close_pipe(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class Waker:
    """A non-blocking pipe one thread waits on and others write to."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._closed = False
        #: Closes both ends once: at close() or when the waker is collected.
        self._finalizer = weakref.finalize(self, _close_pipe, self._read, self._write)

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write, b"!")
            except OSError:  # full: a wake-up is pending already
                pass

    def drain(self) -> None:
        try:
            while os.read(self._read, 512):
                pass
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._finalizer()


class PduReader:
    """The read step of one accepted association (see the module docstring)."""

    def __init__(
        self,
        assoc: Any,
        *,
        prefix: bytes = b"",
        setup_timeout: float,
        network_timeout: float,
        max_pdata: int,
        fast: FastPath | None = None,
    ) -> None:
        self.assoc = assoc
        self._prefix = memoryview(prefix)
        self.setup_timeout = setup_timeout
        self.network_timeout = network_timeout
        self.max_pdata = max_pdata
        self.fast = fast
        self.waker = Waker()
        #: Why the reader dropped the connection, if it did (for logs and tests).
        self.dropped: str | None = None

    def install(self) -> None:
        """Become the association's read step (before it starts). The socket stays in
        blocking mode (reads do not wait: see :meth:`_read_exact`); a send that cannot go
        out for the network timeout (a peer that stopped reading) fails instead of holding
        the network thread (``SO_SNDTIMEO``)."""
        seam.wake_on_send(self.assoc, self.waker.wake)
        seam.replace_read_step(self.assoc, self.read_step)
        asock = self.assoc.dul.socket
        sock = asock.socket if asock is not None else None
        if sock is not None and not isinstance(sock, ssl.SSLSocket):
            seconds = int(self.network_timeout)
            micros = int((self.network_timeout - seconds) * 1_000_000)
            try:
                sock.settimeout(None)
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros)
                )
            except OSError:
                pass

    # -- the reactor's read step -------------------------------------------------------------
    def read_step(self) -> bool:
        """Read one PDU if one comes within :data:`WAIT`; True when something was read or
        the connection was closed (pynetdicom then restarts its idle timer)."""
        assoc = self.assoc
        asock = assoc.dul.socket
        sock = asock.socket if asock is not None else None
        if sock is None:
            return False
        if seam.dul_state(assoc) == "Sta13":  # we are done: discard what is left, then close
            if self._readable(sock, 0.0) and self._discard(sock):
                return True
            asock.close()
            self.waker.close()
            return True
        if seam.stop_requested(assoc):
            return False
        # Events already queued for pynetdicom's state machine (it takes one per loop) go
        # first: waiting for the network now would hold them back.
        if not self._readable(sock, 0.0 if seam.events_pending(assoc) else WAIT):
            return False
        # A run of C-STORE PDUs the fast path serves is read here back to back: returning to
        # pynetdicom's loop after each costs a sleep, which hands the interpreter to other
        # threads. The run ends when anything else comes, something waits to be sent, the
        # reactor is told to stop, or after :data:`RUN` seconds (pynetdicom then restarts its
        # idle timer).
        until = time.monotonic() + RUN
        while (
            self._read_pdu(sock)
            and not seam.stop_requested(assoc)
            and not seam.has_outgoing(assoc)
            and not seam.events_pending(assoc)
            and time.monotonic() < until
            and self._readable(sock, WAIT)
        ):
            pass
        return True

    def _discard(self, sock: socket.socket) -> bool:
        """Read and drop what the peer still sends while we wait for the connection to
        close; False when it closed or nothing came."""
        self._prefix = memoryview(b"")
        try:
            sock.settimeout(0.0)
            return bool(sock.recv(1 << 16))
        except (OSError, ssl.SSLError):
            return False

    def _readable(self, sock: socket.socket, wait: float) -> bool:
        if self._prefix:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            watched: list[Any] = [sock, self.waker]
            ready, _, _ = select.select(watched, [], [], wait)
        except (OSError, ValueError):  # closed meanwhile: the next read reports it
            return True
        if self.waker in ready:
            self.waker.drain()
        return sock in ready

    def _read_pdu(self, sock: socket.socket) -> bool:
        """Read one PDU and hand it on; True when the C-STORE fast path served it."""
        assoc = self.assoc
        state = seam.dul_state(assoc)
        started = time.monotonic()
        timeout = self.network_timeout if state in _ESTABLISHED else self.setup_timeout
        deadline = started + timeout
        try:
            header = self._read_exact(sock, 6, deadline)
            pdu_type, _, length = struct.unpack(">BBL", header)
            limit = self._limit(pdu_type)
            if limit is None or length > limit:
                self._invalid(f"PDU type 0x{pdu_type:02X} of {length} bytes")
                return False
            body = self._read_exact(sock, length, deadline)
        except _Stalled:
            self._drop("stalled", timeout)
            return False
        except _Closed:
            self._closed()
            return False
        if pdu_type == _P_DATA_TF and self.fast is not None and state == "Sta6":
            from dicomai.ingest.fast_store import ProtocolError

            try:
                if self.fast.take(body):
                    return True
            except ProtocolError as exc:
                self._invalid(str(exc))
                return False
        elif self.fast is not None:
            self.fast.reset()
        seam.pass_pdu_to_pynetdicom(assoc, header + body)
        return False

    def _limit(self, pdu_type: int) -> int | None:
        if pdu_type not in _KNOWN_PDU_TYPES:
            return None
        if pdu_type == _P_DATA_TF:
            return self.max_pdata
        if pdu_type in (0x01, 0x02, 0x03):
            return MAX_ASSOCIATION_PDU
        return MAX_OTHER_PDU

    def _read_exact(self, sock: socket.socket, size: int, deadline: float) -> bytes | bytearray:
        """``size`` bytes, from the prefix first; raises :class:`_Stalled` past
        ``deadline`` and :class:`_Closed` when the connection ends first."""
        if self._prefix:
            take = self._prefix[:size]
            self._prefix = self._prefix[len(take) :]
            if len(take) == size:
                return bytes(take)
            head = bytes(take)
            return head + self._read_exact(sock, size - len(head), deadline)
        buf = bytearray(min(size, _FIRST_BUFFER))
        got = 0
        tls = isinstance(sock, ssl.SSLSocket)
        while got < size:
            if got == len(buf):  # grow only as bytes really arrive
                buf.extend(bytes(min(size - got, len(buf))))
            try:
                with memoryview(buf) as whole, whole[got:] as free:
                    if tls:  # no recv flags on TLS: a timeout instead
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise _Stalled()
                        sock.settimeout(remaining)
                        n = sock.recv_into(free)
                    else:  # what is there now, without waiting (and without poll first)
                        n = sock.recv_into(free, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:  # nothing yet: wait for more until the deadline
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
                    raise _Stalled() from None
                continue
            except (TimeoutError, ssl.SSLWantReadError):
                raise _Stalled() from None
            except OSError:
                raise _Closed() from None
            if _QUICKACK is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                except OSError:
                    pass
            if not n:
                raise _Closed()
            got += n
        return buf

    # -- ends ------------------------------------------------------------------------------
    def _peer(self) -> str:
        try:
            return str(self.assoc.requestor.address)
        except Exception:
            return "?"

    def _drop(self, why: str, timeout: float) -> None:
        """Close a connection whose peer stalled inside a PDU; the state machine sees the
        transport close and ends the association (A-P-ABORT)."""
        self.dropped = why
        metrics.observe_connection_dropped(why)
        logger.warning(
            "peer stalled inside a PDU: connection dropped",
            extra=log_fields("association.stalled", peer=self._peer(), timeout_s=timeout),
        )
        self._shutdown()
        self.assoc.dul.event_queue.put("Evt17")

    def _closed(self) -> None:
        self._shutdown()
        self.assoc.dul.event_queue.put("Evt17")

    def _invalid(self, what: str) -> None:
        """An invalid PDU: pynetdicom's state machine answers with an A-ABORT."""
        self.dropped = "invalid_pdu"
        metrics.observe_connection_dropped("invalid_pdu")
        if self.fast is not None:
            self.fast.reset()
        logger.warning(
            "invalid PDU: association aborted",
            extra=log_fields("association.invalid_pdu", peer=self._peer(), detail=what),
        )
        self.assoc.dul.event_queue.put("Evt19")

    def _shutdown(self) -> None:
        asock = self.assoc.dul.socket
        sock = asock.socket if asock is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
