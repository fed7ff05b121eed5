"""The receiver's association servers: accept, optionally hand a connection to another
receiver process, and run each association on its own thread.

pynetdicom's :class:`~pynetdicom.transport.ThreadedAssociationServer` does the TLS handshake
in its accept loop (one slow or silent TLS client holds every other connection back) and has
no way to pass a connection to another process. :class:`AcceptorServer` accepts the plain
TCP connection, asks :attr:`AcceptorServer.dispatch` whether another process takes it, and
otherwise does the TLS handshake (bounded by the ACSE timeout) on the association's own thread.

:class:`HandedOffServer` is the other end, in a receiver child process: it serves the
connections the daemon passes over a Unix socket (``SCM_RIGHTS``) instead of listening itself,
so the daemon decides which process gets which association (the least busy) rather than the
kernel's address hash (``SO_REUSEPORT``), which often put 3 of 4 associations on one process.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicomai.logs import log_fields

__all__ = ["AcceptorServer", "HandedOffServer", "receive_connection", "send_connection"]

logger = logging.getLogger(__name__)

_MAX_MESSAGE = 512


def send_connection(channel: socket.socket, conn: socket.socket,
                    address: tuple[Any, ...]) -> None:
    """Pass ``conn`` (and the peer's address) over the Unix socket ``channel``; the caller
    closes its own descriptor afterwards. Raises ``OSError`` when the other end is gone."""
    socket.send_fds(channel, [json.dumps(list(address)).encode()], [conn.fileno()])


def receive_connection(channel: socket.socket) -> tuple[socket.socket, tuple[Any, ...]] | None:
    """The next connection passed over ``channel``, or ``None`` when the sender closed it."""
    message, fds, _, _ = socket.recv_fds(channel, _MAX_MESSAGE, 1)
    if not fds:
        return None
    conn = socket.socket(fileno=fds[0])
    conn.setblocking(True)
    return conn, tuple(json.loads(message.decode()))


class _Handler(RequestHandler):
    """pynetdicom's request handler, waiting for the association's end (so the server
    knows when a connection it served is over)."""

    def handle(self) -> None:
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()


class AcceptorServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TLS on the connection's thread and hand-off."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.RequestHandlerClass = _Handler

    #: Called with each verified connection: True when another process took it over (the
    #: connection is then closed here), False to serve it in this process.
    dispatch: Callable[[socket.socket, tuple[Any, ...]], bool] | None = None
    #: Called when a connection served in this process has ended.
    on_connection_done: Callable[[], None] | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        return self.socket.accept()  # TLS, if any, on the connection's thread

    def process_request(self, request: Any, client_address: Any) -> None:
        dispatch = self.dispatch
        if dispatch is not None:
            try:
                taken = dispatch(request, client_address)
            except Exception:
                logger.exception("hand-off failed; served here", extra=log_fields(
                    "receiver.handoff_failed"))
                taken = False
            if taken:
                request.close()  # the other process holds its own descriptor
                return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.ssl_context is not None:
                try:
                    request = self._tls(request)
                except OSError as exc:  # handshake failed or timed out: nothing to serve
                    logger.warning("TLS handshake failed", extra=log_fields(
                        "association.tls_failed", peer=str(client_address[0]),
                        error=type(exc).__name__))
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            done = self.on_connection_done
            if done is not None:
                done()

    def _tls(self, request: socket.socket) -> socket.socket:
        assert self.ssl_context is not None
        request.settimeout(self.ae.acse_timeout or 30.0)
        wrapped = self.ssl_context.wrap_socket(request, server_side=True)
        wrapped.settimeout(None)
        return wrapped


class HandedOffServer(AcceptorServer):
    """A server that listens on nothing: its connections come over the Unix socket
    :attr:`channel` (set it before ``serve_forever``), sent by the daemon's
    :class:`AcceptorServer`. When the channel closes (the daemon is gone) :attr:`on_eof` is
    called once."""

    channel: socket.socket | None = None
    on_eof: Callable[[], None] | None = None
    _eof = False

    def server_bind(self) -> None:  # nothing to bind: see the class docstring
        pass

    def server_activate(self) -> None:
        pass

    def fileno(self) -> int:
        assert self.channel is not None
        return self.channel.fileno()

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.channel is not None
        received = receive_connection(self.channel)
        if received is None:
            if not self._eof:
                self._eof = True
                if self.on_eof is not None:
                    self.on_eof()
            threading.Event().wait(0.2)  # the owner stops us; do not spin meanwhile
            raise OSError("hand-off channel closed")
        return received

    def server_close(self) -> None:
        super().server_close()
        if self.channel is not None:
            self.channel.close()
