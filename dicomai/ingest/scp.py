"""The DICOM Storage SCP: our AE, its presentation contexts, the association's set-up (PDU
reader, C-STORE fast path, answers pynetdicom would not give), its bookkeeping, and start/stop.

Connections come from :mod:`dicomai.ingest.listener` through :mod:`dicomai.ingest.lobby`;
every C-STORE ends in :func:`dicomai.ingest.store_instance.store_instance`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import datetime
from io import BytesIO
from typing import Any, cast

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext, StoragePresentationContexts

from dicomai import __version__, audit
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
from dicomai.ingest.store_instance import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    handle_store,
    store_instance,
)
from dicomai.logs import log_fields

__all__ = ["IMPLEMENTATION_CLASS_UID", "TRANSFER_SYNTAXES", "Receiver", "handle_echo"]

logger = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1.71"
#: The Verification SOP Class (C-ECHO).
VERIFICATION = UID("1.2.840.10008.1.1")
#: Longest sleep of an association's thread with nothing to do (it wakes at once for a
#: message, a release or an abort; this bounds how late it sees the idle timer).
_ASSOCIATION_POLL = 0.05
IMPLEMENTATION_VERSION_NAME = f"DICOMAI_{__version__}"[:16]

#: Accepted transfer syntaxes; instances are stored exactly as received.
TRANSFER_SYNTAXES: list[UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessP14,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO handler."""
    return STATUS_SUCCESS


def _misfit_store(assoc: Any, msg: Any, context_id: int) -> PresentationContext | None:
    """The accepted context of a C-STORE-RQ that pynetdicom would not answer as a Storage
    SCP must, else ``None`` (pynetdicom's own handling is right).

    pynetdicom 3.0.4 drops a request missing a mandatory parameter without any response (an
    empty Affected SOP Instance UID reads as none), aborts the association when the
    Affected SOP Class UID names no SOP class it knows, and otherwise serves the request
    whatever context it arrived on."""
    if not isinstance(msg, C_STORE) or msg.MessageID is None or seam.release_started(assoc):
        return None  # not a request (a response has no Message ID), or ignored in a release
    context = seam.accepted_context(assoc, context_id)
    if context is None or not context.transfer_syntax:
        return None  # pynetdicom aborts, as for any message on a context never accepted
    if msg.is_valid_request and str(msg.AffectedSOPClassUID) == str(context.abstract_syntax):
        return None
    return context


def _answer_store(
    assoc: Any, msg: C_STORE, context: PresentationContext, store: Callable[[StoreRequest], int]
) -> None:
    """Serve a :func:`_misfit_store` request by ``store`` (which refuses what
    :func:`check_command` refuses, as on the fast path) and send its C-STORE-RSP."""
    try:
        req = StoreRequest(
            calling_ae=assoc.requestor.ae_title.strip(),
            peer=str(assoc.requestor.address),
            assoc_key=id(assoc),
            transfer_syntax=UID(str(context.transfer_syntax[0])),
            sop_class_uid=str(msg.AffectedSOPClassUID or ""),
            sop_instance_uid=str(msg.AffectedSOPInstanceUID or ""),
            dataset=msg.DataSet if msg.DataSet is not None else BytesIO(),
            context_sop_class=str(context.abstract_syntax),
        )
    except Exception:
        logger.exception("store handler failed", extra=log_fields("instance.handler_failed"))
        status = STATUS_OUT_OF_RESOURCES
    else:
        status = store(req)  # never raises
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg.MessageID
    rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID  # left out of the response when None
    rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
    rsp.Status = status
    if assoc.is_established:
        assoc.dimse.send_msg(rsp, cast(int, context.context_id))


def _guard_store_requests(assoc: Any, store: Callable[[StoreRequest], int]) -> None:
    """Answer every C-STORE-RQ that reaches pynetdicom's DIMSE layer (``fast_store =
    false``, or a request the fast path leaves to pynetdicom) as the fast path does: those of
    :func:`_misfit_store` by :func:`_answer_store`, the others by pynetdicom (EVT_C_STORE,
    :func:`handle_store`)."""

    def guarded(serve_request: Callable[[Any, int], None], msg: Any, context_id: int) -> None:
        context = _misfit_store(assoc, msg, context_id)
        if context is None:
            serve_request(msg, context_id)
        else:
            _answer_store(assoc, msg, context, store)

    seam.wrap_serve_request(assoc, guarded)


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


def _copy_context(cx: PresentationContext) -> PresentationContext:
    """A copy of a presentation context as independent as ``deepcopy``'s: its attributes are
    ints, bools, ``None``, UIDs (immutable) and the list of transfer syntax UIDs."""
    new = PresentationContext.__new__(PresentationContext)
    new.__dict__ = {k: (list(v) if isinstance(v, list) else v) for k, v in cx.__dict__.items()}
    return new


class _SupportedContexts(list):  # type: ignore[type-arg]
    """The server's supported contexts; pynetdicom deep-copies them for every association.

    ``deepcopy`` rebuilds every UID through pydicom's validating constructor: about 1,500 per
    association with our ~120 storage contexts, 10 ms and more of a new association's set-up
    on the machines measured. This copies them cheaply (and as deeply: see
    :func:`_copy_context`)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [_copy_context(cx) for cx in self]


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
        self._transfers: dict[int, dict[str, int]] = {}
        #: Associations started and not finished yet, by id (for :meth:`_sweep`).
        self._started: dict[int, Any] = {}
        #: Called after an association released and its studies were marked (the daemon
        #: wakes the scheduler with it so an early close need not wait for the next tick).
        self.on_release: Callable[[], None] | None = None
        #: C-STORE requests served by the fast path (:mod:`dicomai.ingest.fast_store`) so far.
        self.fast_store_requests = 0
        #: Flushes the files of small instances committed with their bytes (dicomai.ingest.copies).
        self.copies = CopyFlusher(index)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self.server is None:
            raise RuntimeError("receiver not started")
        return int(self.server.server_address[1])

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.require_called_aet = True
        ae.require_calling_aet = list(s.allowed_calling_ae_titles)
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.acse_timeout_seconds
        ae.dimse_timeout = s.dimse_timeout_seconds
        ae.network_timeout = s.network_timeout_seconds
        # Announced in the A-ASSOCIATE-AC (PS3.8 D.1, Maximum Length Received): the largest
        # P-DATA-TF PDU a conformant peer sends us; never 0 ("no maximum").
        ae.maximum_pdu_size = s.max_pdu_length
        ae.add_supported_context(VERIFICATION)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cast(str, cx.abstract_syntax), TRANSFER_SYNTAXES)
        return ae

    def _prepare(self, assoc: Any, prefix: bytes) -> None:
        """Set up a new association before it starts: our PDU reader (deadlines, size caps,
        the bytes the lobby read), the C-STORE fast path, and the answer to C-STORE requests
        pynetdicom would leave unanswered or abort on (:func:`_guard_store_requests`)."""
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
        _guard_store_requests(assoc, self._store)
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
            self._tally,
            self.copies,
        )

    def _tally(self, assoc_key: int, study_uid: str) -> None:
        with self._lock:
            per_study = self._transfers.setdefault(assoc_key, {})
            per_study[study_uid] = per_study.get(study_uid, 0) + 1

    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self._transfers.setdefault(id(event.assoc), {})
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

    def open_transfer(self, key: int) -> None:
        """Start counting the studies a transfer delivers (an association, or a STOW-RS
        request of :mod:`dicomai.ingest.stow_server`): :meth:`tally` counts its instances,
        :meth:`close_transfer` ends it. Keys must be unique among open transfers."""
        with self._lock:
            self._transfers.setdefault(key, {})

    def tally(self, key: int, study_uid: str) -> None:
        """One more instance of ``study_uid`` stored by transfer ``key``."""
        self._tally(key, study_uid)

    def close_transfer(self, key: int, *, released: bool) -> dict[str, int] | None:
        """End transfer ``key``: its instances per study (``None`` when it was closed
        already: the first caller pops), and, when ``released`` (an association released,
        a STOW-RS request answered), the early-close mark of its studies that no other open
        transfer is still delivering. A study arriving partly over DIMSE and partly over
        DICOMweb is one study: both kinds of transfer are counted here."""
        with self._lock:
            per_study = self._transfers.pop(key, None)
            # A study another open transfer is still delivering is not released yet.
            still_open = {uid for other in self._transfers.values() for uid in other}
        if per_study and released:
            self._released([uid for uid in per_study if uid not in still_open])
        return per_study

    def _finish(self, assoc: Any, *, released: bool) -> None:
        """One audit event per study the association delivered, and, on a release, the
        early-close mark of those studies (once per association)."""
        per_study = self.close_transfer(id(assoc), released=released)
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

    def _released(self, study_uids: list[str]) -> None:
        if not study_uids:
            return
        try:
            self.index.mark_released(study_uids, self.clock())
        except Exception:  # the studies then close after their quiet period instead
            logger.exception(
                "could not mark studies released",
                extra=log_fields("association.release_mark_failed"),
            )
            return
        if self.on_release is not None:
            try:
                self.on_release()
            except Exception:
                logger.exception(
                    "release callback failed", extra=log_fields("association.release_mark_failed")
                )

    def _tls_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if self.ssl_context is not None or s.tls_cert_file is None:
            return self.ssl_context
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(s.tls_cert_file), str(s.tls_key_file))
        if s.tls_ca_file is not None:
            ctx.load_verify_locations(str(s.tls_ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED if s.tls_require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def _peer_allowed(self, address: str) -> bool:
        nets = [ipaddress.ip_network(n, strict=False) for n in self.settings.allowed_peer_addresses]
        if not nets:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in nets)

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
        ae = self._make_ae()

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
                    self._tally,
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
                evt_handlers=handlers,  # type: ignore[arg-type]
                server_class=listener_class(s.listen_backlog),
            ),
        )
        server.contexts = _SupportedContexts(server.contexts)
        server.prepare = self._prepare
        lobby = Lobby(
            LobbyLimits(
                setup_timeout=s.acse_timeout_seconds,
                max_pending=s.max_pending_connections,
                max_pending_per_address=s.max_pending_per_address,
            ),
            ssl_context=self._tls_context(),
            promote=server.start_association,
            tick=self._sweep,
        )
        server.lobby = lobby

        def verify_request(request: Any, client_address: tuple[str, int]) -> bool:
            allowed = self._peer_allowed(client_address[0])
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

        server.verify_request = verify_request  # type: ignore[method-assign]
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
