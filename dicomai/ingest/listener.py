"""The listening socket: accept, check the peer's address, and hand over to the lobby.

:class:`Listener` is pynetdicom's association server (its handlers, contexts and events)
with three changes of ours:

- the accept loop only accepts: the TLS handshake and the wait for the A-ASSOCIATE-RQ happen
  in the :class:`~dicomai.ingest.lobby.Lobby`, where they cost no thread and are timed out;
- the listen backlog is ``[receiver] listen_backlog`` (Python's default is 5: a PACS opening
  several associations at once, or a burst of connections, would see refusals);
- an association starts only when the lobby promotes its connection, with the bytes the lobby
  read, and only if fewer than ``max_associations`` associations are open; otherwise the
  request is rejected at once (A-ASSOCIATE-RJ, transient, local limit exceeded) without
  starting anything.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicomai import audit, metrics
from dicomai.ingest import pynetdicom_seam as seam
from dicomai.ingest.lobby import Lobby, a_associate_rj
from dicomai.logs import log_fields

__all__ = ["Listener", "listener_class"]

logger = logging.getLogger(__name__)

#: Connections accepted at most per wake-up of the accept loop besides the first.
_DRAIN_AT_MOST = 1024
# A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local limit exceeded.
_BUSY = a_associate_rj(result=0x02, source=0x03, reason=0x02)


class _Handler(RequestHandler):
    """Builds and starts the association of a promoted connection."""

    server: Listener

    def handle(self) -> None:
        server = self.server
        assoc = seam.create_acceptor(self)
        prefix = server.take_prefix(self.request)
        if server.prepare is not None:
            server.prepare(assoc, prefix)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class Listener(ThreadedAssociationServer):
    """pynetdicom's server, accepting into a :class:`Lobby` (see the module docstring).

    Set :attr:`lobby` and :attr:`prepare` before ``serve_forever``."""

    lobby: Lobby | None = None
    #: Called with each new association (not started yet) and the bytes already read.
    prepare: Callable[[Any, bytes], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.RequestHandlerClass = _Handler
        self._prefixes: dict[int, bytes] = {}
        self._prefix_lock = threading.Lock()
        #: Association requests rejected because max_associations were open.
        self.rejected_busy = 0

    def get_request(self) -> tuple[socket.socket, Any]:
        """The next connection (TLS and the association request are the lobby's). The
        connections queued behind it are accepted now too and go straight to the lobby: one
        per wake-up of the accept loop would let a burst overflow the listen backlog, and a
        peer whose connection attempt is dropped retries only after a second or more."""
        listening = self.socket
        assert listening is not None
        first = listening.accept()
        timeout = listening.gettimeout()
        listening.settimeout(0.0)
        try:
            for _ in range(_DRAIN_AT_MOST):
                try:
                    conn, address = listening.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if self.verify_request(conn, address):
                    self.process_request(conn, address)
                else:
                    self.shutdown_request(conn)
        finally:
            listening.settimeout(timeout)
        return first

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.lobby is None:
            self.shutdown_request(request)
            return
        self.lobby.admit(request, client_address)

    def take_prefix(self, sock: Any) -> bytes:
        with self._prefix_lock:
            return self._prefixes.pop(id(sock), b"")

    def open_acceptors(self) -> int:
        return sum(1 for a in self.ae.active_associations if a.is_acceptor)

    def start_association(self, sock: Any, address: tuple[Any, ...], prefix: bytes) -> None:
        """The lobby's ``promote``: start the association, or reject it when full."""
        if self.open_acceptors() >= self.ae.maximum_associations:
            self.rejected_busy += 1
            metrics.observe_connection_dropped("local_limit")
            logger.warning(
                "association rejected: too many open",
                extra=log_fields(
                    "association.rejected",
                    reason="local_limit",
                    peer=str(address[0]),
                    limit=self.ae.maximum_associations,
                ),
            )
            called, calling = _ae_titles(prefix)
            audit.association(
                accepted=False,
                calling_ae=calling,
                called_ae=called,
                peer=str(address[0]),
                local=str(self.server_address[0]),
                reason="local limit exceeded",
            )
            try:
                sock.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(sock)
            return
        with self._prefix_lock:
            self._prefixes[id(sock)] = prefix
        try:
            self.finish_request(sock, address)
        finally:
            self.take_prefix(sock)  # normally taken by the handler already


def _ae_titles(request: bytes) -> tuple[str, str]:
    """Called and calling AE titles of an A-ASSOCIATE-RQ PDU (PS3.8 9.3.2)."""

    def title(raw: bytes) -> str:
        return raw.decode("ascii", "replace").strip() or "-"

    return title(request[10:26]), title(request[26:42])


def listener_class(backlog: int) -> type[Listener]:
    """A :class:`Listener` class listening with ``backlog`` (socketserver reads it from the
    class while it binds)."""
    return type("Listener", (Listener,), {"request_queue_size": backlog})
