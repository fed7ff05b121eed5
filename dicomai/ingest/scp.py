"""The DICOM Storage SCP: the association's set-up (PDU reader, C-STORE fast path, answers
pynetdicom would not give), its bookkeeping, and start/stop.

Our AE and its presentation contexts are :mod:`dicomai.ingest.storage_ae`; connections come
from :mod:`dicomai.ingest.listener` through :mod:`dicomai.ingest.lobby`; the studies each
association delivers are counted by :mod:`dicomai.ingest.transfers`; every C-STORE ends in
:func:`dicomai.ingest.store_instance.store_instance`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from pynetdicom import AE, evt

from dicomai import audit
from dicomai.config import ReceiverSettings
from dicomai.ingest import pynetdicom_seam as seam
from dicomai.ingest import uid_cache
from dicomai.ingest.copies import CopyFlusher
from dicomai.ingest.fast_store import FastStore, StoreRequest
from dicomai.ingest.index import InstanceIndex
from dicomai.ingest.listener import Listener, listener_class
from dicomai.ingest.lobby import Lobby, LobbyLimits
from dicomai.ingest.pdu_reader import PduReader
from dicomai.ingest.spool import Spool
from dicomai.ingest.storage_ae import SupportedContexts, make_ae
from dicomai.ingest.store_guard import guard_store_requests
from dicomai.ingest.store_instance import STATUS_SUCCESS, handle_store, store_instance
from dicomai.ingest.transfers import Transfers
from dicomai.logs import log_fields

__all__ = ["Receiver", "handle_echo"]

logger = logging.getLogger(__name__)

#: Longest sleep of an association's thread with nothing to do (it wakes at once for a
#: message, a release or an abort; this bounds how late it sees the idle timer).
_ASSOCIATION_POLL = 0.05


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO handler."""
    return STATUS_SUCCESS


def _audit_association(event: evt.Event, accepted: bool) -> None:
    req, acc = event.assoc.requestor, event.assoc.acceptor
    audit.association(
        accepted=accepted,
        calling_ae=req.ae_title.strip(),
        called_ae=acc.ae_title.strip(),
        peer=str(req.address),
        local=str(acc.address),
        reason=None if accepted else "rejected",
    )


def _on_accepted(event: evt.Event) -> None:
    req = event.assoc.requestor
    logger.info(
        "association accepted",
        extra=log_fields("association.accepted", calling_ae=req.ae_title.strip(), peer=req.address),
    )
    _audit_association(event, True)


def _on_rejected(event: evt.Event) -> None:
    req = event.assoc.requestor
    logger.warning(
        "association rejected",
        extra=log_fields("association.rejected", calling_ae=req.ae_title.strip(), peer=req.address),
    )
    _audit_association(event, False)


def _tls_context(settings: ReceiverSettings) -> ssl.SSLContext | None:
    """The server side of DICOM TLS from ``tls_cert_file``/``tls_key_file`` (client
    certificates verified against ``tls_ca_file`` when set); None without a certificate."""
    s = settings
    if s.tls_cert_file is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(s.tls_cert_file), str(s.tls_key_file))
    if s.tls_ca_file is not None:
        ctx.load_verify_locations(str(s.tls_ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if s.tls_require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def _peer_allowed(allowed: list[str], address: str) -> bool:
    """Whether ``address`` is in one of the ``allowed`` addresses and networks (none: any)."""
    nets = [ipaddress.ip_network(n, strict=False) for n in allowed]
    if not nets:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in nets)


class Receiver:
    """The Storage SCP component."""

    def __init__(
        self,
        settings: ReceiverSettings,
        spool: Spool,
        index: InstanceIndex,
        clock: Callable[[], datetime],
        ssl_context: Any = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.index = index
        self.clock = clock
        self.ssl_context = ssl_context
        #: Free-space floor of the spool in bytes; below it C-STORE answers 0xA700.
        self.min_free_bytes = settings.min_free_disk_mb * 1024 * 1024
        self.ae: AE | None = None
        self.server: Listener | None = None
        #: Connections that have not associated yet (dicomai.ingest.lobby).
        self.lobby: Lobby | None = None
        self._lock = threading.Lock()
        #: Associations started and not finished yet, by id (for :meth:`_sweep`).
        self._started: dict[int, Any] = {}
        #: Called after an association released and its studies were marked (the daemon
        #: wakes the scheduler with it so an early close need not wait for the next tick).
        self.on_release: Callable[[], None] | None = None
        #: C-STORE requests served by the fast path (:mod:`dicomai.ingest.fast_store`) so far.
        self.fast_store_requests = 0
        #: Flushes the files of small instances committed with their bytes (dicomai.ingest.copies).
        self.copies = CopyFlusher(index)
        #: The studies each open transfer delivers (associations here, STOW-RS requests of
        #: dicomai.ingest.stow_server), and the early-close mark of released ones.
        self.transfers = Transfers(index, clock, self._after_release)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self.server is None:
            raise RuntimeError("receiver not started")
        return int(self.server.server_address[1])

    def _prepare(self, assoc: Any, prefix: bytes) -> None:
        """Set up a new association before it starts: our PDU reader (deadlines, size caps,
        the bytes the lobby read), the C-STORE fast path, and the answer to C-STORE requests
        pynetdicom would leave unanswered or abort on (:mod:`dicomai.ingest.store_guard`)."""
        s = self.settings
        try:
            sock = assoc.dul.socket.socket
            if not hasattr(sock, "pending"):  # TLS sockets: Nagle is moot for our writes
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            pass
        fast = FastStore(assoc, self._serve_store) if s.fast_store else None
        reader = PduReader(
            assoc,
            prefix=prefix,
            setup_timeout=s.acse_timeout_seconds,
            network_timeout=s.network_timeout_seconds,
            max_pdata=s.max_pdu_length,
            fast=fast,
        )
        reader.install()
        seam.replace_association_loop(assoc, poll=_ASSOCIATION_POLL)
        assoc.dicomai_reader = reader  # for tests and diagnostics
        assoc.dicomai_fast_store = fast
        guard_store_requests(assoc, self._store)
        with self._lock:
            self._started[id(assoc)] = assoc

    def _sweep(self) -> None:
        """Finish the bookkeeping of associations whose thread ended without an end event
        (about once a second, on the lobby thread)."""
        with self._lock:
            ended = [a for a in self._started.values() if a.ident is not None and not a.is_alive()]
            for assoc in ended:
                del self._started[id(assoc)]
        for assoc in ended:
            self._finish(assoc, released=bool(assoc.is_released))
            reader = getattr(assoc, "dicomai_reader", None)
            if reader is not None:
                reader.waker.close()

    def _serve_store(self, req: StoreRequest) -> int:
        """The fast path's store step (:func:`store_instance`, looked up at each call)."""
        with self._lock:
            self.fast_store_requests += 1
        return self._store(req)

    def _store(self, req: StoreRequest) -> int:
        return store_instance(
            req,
            self.spool,
            self.index,
            lambda: self.min_free_bytes,
            self.clock,
            self.transfers.tally,
            self.copies,
        )

    def _on_accepted(self, event: evt.Event) -> None:
        self.transfers.open(id(event.assoc))
        _on_accepted(event)

    def _on_ended(self, event: evt.Event) -> None:
        """EVT_RELEASED, EVT_ABORTED or EVT_CONN_CLOSE: finish the association's bookkeeping.

        The network thread may see the connection close before the association thread reports
        the release (the peer closes as soon as it has our A-RELEASE-RP). Deciding at
        EVT_CONN_CLOSE would then miss the release, so while the association thread still
        runs, a short-lived watcher waits for it and finishes from its ``is_released``.
        """
        assoc = event.assoc
        if event.event is evt.EVT_CONN_CLOSE:
            if assoc.is_alive() and assoc is not threading.current_thread():
                threading.Thread(
                    target=self._finish_after, args=(assoc,), daemon=True, name="assoc-end"
                ).start()
            else:
                self._finish(assoc, released=bool(assoc.is_released))
            return
        self._finish(assoc, released=event.event is evt.EVT_RELEASED)

    def _finish_after(self, assoc: Any, timeout: float = 120.0) -> None:
        assoc.join(timeout)
        self._finish(assoc, released=bool(assoc.is_released))

    def _finish(self, assoc: Any, *, released: bool) -> None:
        """One audit event per study the association delivered, and, on a release, the
        early-close mark of those studies (once per association)."""
        per_study = self.transfers.close(id(assoc), released=released)
        if per_study is None:
            return
        req, acc = assoc.requestor, assoc.acceptor
        if per_study or released:
            logger.info(
                "association ended",
                extra=log_fields(
                    "association.released",
                    calling_ae=req.ae_title.strip(),
                    studies=len(per_study),
                    instances=sum(per_study.values()),
                ),
            )
        for study_uid, count in per_study.items():
            audit.instances_transferred(
                received=True,
                study_uid=study_uid,
                count=count,
                source_ae=req.ae_title.strip(),
                source_address=str(req.address),
                destination_ae=acc.ae_title.strip(),
                destination_address=str(acc.address),
            )

    def _after_release(self) -> None:
        if self.on_release is not None:
            self.on_release()

    def start(self) -> None:
        """Bind and serve in background threads.

        Raises :class:`~dicomai.ingest.pynetdicom_seam.SeamError` when the installed
        pynetdicom is not the version our seam with it was written for."""
        seam.check()
        uid_cache.install()  # standard UIDs of association requests converted once
        self.copies.start()
        try:
            self.spool.prepare()  # the first spool files, before the first C-STORE
        except OSError:  # e.g. disk full: each C-STORE tries again and answers 0xA700
            logger.warning(
                "could not pre-create spool files",
                exc_info=True,
                extra=log_fields("spool.slots_failed"),
            )
        s = self.settings
        if s.processes != 1:
            logger.warning(
                "[receiver] processes is retired and ignored",
                extra=log_fields("config.retired_key", key="receiver.processes", value=s.processes),
            )
        ae = make_ae(s)

        handlers = [
            (evt.EVT_C_ECHO, handle_echo),
            (
                evt.EVT_C_STORE,
                handle_store,
                [
                    self.spool,
                    self.index,
                    lambda: self.min_free_bytes,
                    self.clock,
                    self.transfers.tally,
                    self.copies,
                ],
            ),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, _on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
        ]
        server = cast(
            Listener,
            ae.make_server(
                (s.host, s.port),
                evt_handlers=handlers,  # type: ignore[arg-type]  # pynetdicom annotates it too narrowly
                server_class=listener_class(s.listen_backlog),
            ),
        )
        server.contexts = SupportedContexts(server.contexts)
        server.prepare = self._prepare
        lobby = Lobby(
            LobbyLimits(
                setup_timeout=s.acse_timeout_seconds,
                max_pending=s.max_pending_connections,
                max_pending_per_address=s.max_pending_per_address,
            ),
            ssl_context=self.ssl_context if self.ssl_context is not None else _tls_context(s),
            promote=server.start_association,
            tick=self._sweep,
        )
        server.lobby = lobby

        def verify_request(request: Any, client_address: tuple[str, int]) -> bool:
            allowed = _peer_allowed(s.allowed_peer_addresses, client_address[0])
            if not allowed:
                logger.warning(
                    "connection refused",
                    extra=log_fields(
                        "association.rejected", reason="peer_address", peer=client_address[0]
                    ),
                )
                audit.security_alert(
                    reason="connection refused: peer address not allowed", peer=client_address[0]
                )
            return allowed

        server.verify_request = verify_request  # type: ignore[method-assign]  # socketserver hook
        lobby.start()
        threading.Thread(target=server.serve_forever, name="receiver-acceptor", daemon=True).start()
        seam.register_server(ae, server)  # so that ae.shutdown() stops it too
        with self._lock:
            self.ae, self.server, self.lobby = ae, server, lobby
        logger.info(
            "receiver listening",
            extra=log_fields("receiver.started", ae_title=s.ae_title, host=s.host, port=self.port),
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, wait (bounded) for open associations, then shut down."""
        with self._lock:
            ae, server, lobby = self.ae, self.server, self.lobby
            self.ae = self.server = self.lobby = None
        if server is None or ae is None:
            self.copies.stop(timeout)
            return
        server.shutdown()
        if lobby is not None:
            lobby.stop()
        deadline = self.clock().timestamp() + timeout
        # Wait for established associations only: a bare TCP connection (a port probe) that
        # never sent an association request would otherwise hold shutdown for acse_timeout.
        while (
            any(a.is_established for a in ae.active_associations)
            and self.clock().timestamp() < deadline
        ):
            threading.Event().wait(0.05)
        ae.shutdown()
        self.copies.stop(timeout)
        logger.info("receiver stopped", extra=log_fields("receiver.stopped"))
