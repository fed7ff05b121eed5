"""The DICOMweb STOW-RS receiver: an HTTP server beside the DIMSE one (``[dicomweb]``).

``POST {path}/studies`` and ``POST {path}/studies/{study}`` take a ``multipart/related;
type="application/dicom"`` body, one Part 10 file per part. The body is read as it streams
in (:mod:`dicomai.ingest.stow_parts`), never whole; each complete part is stored exactly
as a C-STORE would be: a :class:`~dicomai.ingest.fast_store.StoreRequest` from its file meta
(calling AE ``DICOMWEB``, the client's address as peer) passed to
:func:`~dicomai.ingest.store_instance.store_instance` with the DIMSE receiver's spool, index,
free-space floor and copy flusher (durable before the answer, duplicates answered as stored,
quarantine and file limits). A request is a transfer of the DIMSE receiver
(:meth:`~dicomai.ingest.scp.Receiver.open_transfer`): its instances are tallied per study and
its answer counts as a release, so early close works, and a study arriving partly over DIMSE
and partly over DICOMweb is one study.

At the door, in this order: the caller's address (``allowed_peer_addresses``, 403), its
credentials (``auth``, 401 with ``WWW-Authenticate``), the Content-Type (415; 400 without a
boundary), the declared size (``max_request_mb``, 413) and the spool's free-space floor (503).
The answer is the PS3.18 response data set (:mod:`dicomai.ingest.stow_response`).

The server is uvicorn (ASGI, HTTP/1.1) running a Starlette application on a thread of its own;
parts are stored on a small thread pool, so the event loop keeps serving other requests. The
access log names method, path, status and counts, never a header value or the body.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import uvicorn
from pydicom.uid import UID
from pynetdicom.presentation import StoragePresentationContexts
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import dicomai.ingest.file_limits as file_limits
from dicomai import audit, metrics
from dicomai.config import DicomWebSettings, Settings
from dicomai.http_auth import HttpCredentials, SecretUnavailable, credentials
from dicomai.ingest.fast_store import StoreRequest
from dicomai.ingest.record import getter, text_value
from dicomai.ingest.scp import TRANSFER_SYNTAXES, Receiver
from dicomai.ingest.store_instance import STATUS_SUCCESS, store_instance
from dicomai.ingest.stow_parts import (
    BadRequest,
    Part,
    PartProblem,
    PartReader,
    UnsupportedMediaType,
    boundary_of,
)
from dicomai.ingest.stow_response import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_DATASET_MISMATCH,
    FAILURE_OUT_OF_RESOURCES,
    FAILURE_SOP_CLASS_NOT_SUPPORTED,
    FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED,
    MEDIA_TYPE,
    Outcome,
    failure_reason,
    http_status,
    response_body,
)
from dicomai.logs import log_fields, uid_ref

__all__ = ["CALLING_AE", "DicomWebReceiver"]

logger = logging.getLogger(__name__)

#: The calling AE title recorded for instances received over DICOMweb.
CALLING_AE = "DICOMWEB"
_TRANSFER_SYNTAXES = frozenset(str(ts) for ts in TRANSFER_SYNTAXES)
_STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in StoragePresentationContexts)
_UID_CHARS = frozenset("0123456789.")
#: Status logged and counted for a client that went away before its answer.
_CLIENT_GONE = 499
_REALM = 'realm="dicomai"'


@dataclass(slots=True)
class _Transfer:
    """One STOW-RS request's state while its body streams in."""

    key: int
    peer: str
    user: str
    study: str | None
    outcomes: list[Outcome] = field(default_factory=list)
    received_bytes: int = 0
    #: The store of the part before the one being read (at most one per request).
    pending: asyncio.Future[Outcome] | None = None


def _is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and set(value) <= _UID_CHARS and ".." not in value


class DicomWebReceiver:
    """The STOW-RS server of ``settings.dicomweb``, storing through ``receiver``."""

    def __init__(
        self, settings: Settings, receiver: Receiver, clock: Callable[[], datetime]
    ) -> None:
        self.settings: DicomWebSettings = settings.dicomweb
        self.ae_title = settings.receiver.ae_title
        self.receiver = receiver
        self.clock = clock
        s = self.settings
        self.credentials: HttpCredentials = credentials(
            s.auth,
            user=s.user,
            password_file=settings.resolve(s.password_file) if s.password_file else None,
            token_file=settings.resolve(s.token_file) if s.token_file else None,
        )
        self._tls = (
            (settings.resolve(s.tls_cert_file), settings.resolve(s.tls_key_file))
            if s.tls_cert_file and s.tls_key_file
            else None
        )
        self._networks = [ipaddress.ip_network(n, strict=False) for n in s.allowed_peer_addresses]
        self._keys = itertools.count(1)
        self._pool: ThreadPoolExecutor | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._failure: BaseException | None = None
        prefix = s.path
        self.app = Starlette(
            routes=[
                Route(f"{prefix}/studies", self._stow, methods=["POST"]),
                Route(f"{prefix}/studies/{{study}}", self._stow, methods=["POST"]),
            ]
        )

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._socket is None:
            raise RuntimeError("DICOMweb receiver not started")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """The service root clients are given, e.g. ``http://127.0.0.1:8080/dicomweb``."""
        scheme = "https" if self._tls else "http"
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}{self.settings.path}"

    def start(self, timeout: float = 30.0) -> None:
        """Bind, then serve on a thread of its own; returns once the server accepts."""
        s = self.settings
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.host, s.port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._pool = ThreadPoolExecutor(
            max_workers=min(8, s.max_connections), thread_name_prefix="stow-store"
        )
        config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            limit_concurrency=s.max_connections,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=10,
            server_header=False,
            ssl_certfile=str(self._tls[0]) if self._tls else None,
            ssl_keyfile=str(self._tls[1]) if self._tls else None,
        )
        server = uvicorn.Server(config)
        self._server = server

        def serve() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as exc:  # reported by start()
                self._failure = exc

        self._thread = threading.Thread(target=serve, name="dicomweb-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                failure = self._failure
                self.stop(1.0)
                raise RuntimeError(f"DICOMweb receiver did not start: {failure!r}")
            time.sleep(0.01)
        logger.info(
            "DICOMweb receiver listening",
            extra=log_fields(
                "dicomweb.started",
                host=s.host,
                port=self.port,
                path=s.path or "/",
                tls=self._tls is not None,
                auth=s.auth,
            ),
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting; requests in progress get ``timeout`` seconds to finish."""
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(5.0)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._pool = None
        if server is not None:
            logger.info("DICOMweb receiver stopped", extra=log_fields("dicomweb.stopped"))

    # -- the door ----------------------------------------------------------------------------
    def _peer_allowed(self, address: str) -> bool:
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)

    def _refuse(
        self,
        request: Request,
        status: int,
        reason: str,
        peer: str,
        headers: dict[str, str] | None = None,
    ) -> Response:
        audit.http_caller(accepted=False, user="-", peer=peer, local=self._local(), reason=reason)
        if status in (401, 403):
            audit.security_alert(reason=f"DICOMweb request refused: {reason}", peer=peer)
        self._log(request, status, peer, started=time.monotonic(), reason=reason)
        return Response(status_code=status, headers=headers)

    def _local(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def _stow(self, request: Request) -> Response:
        started = time.monotonic()
        peer = request.client.host if request.client is not None else ""
        if not self._peer_allowed(peer):
            return self._refuse(request, 403, "peer address not allowed", peer)
        try:
            authorized = self.credentials.accepts(request.headers.get("authorization"))
        except SecretUnavailable as exc:
            logger.error(
                "DICOMweb credentials unavailable",
                extra=log_fields("dicomweb.auth_unavailable", error=str(exc)),
            )
            return self._refuse(
                request, 503, "credentials unavailable", peer, {"Retry-After": "60"}
            )
        if not authorized:
            scheme = "Basic" if self.settings.auth == "basic" else "Bearer"
            return self._refuse(
                request, 401, "wrong credentials", peer, {"WWW-Authenticate": f"{scheme} {_REALM}"}
            )
        study = request.path_params.get("study")
        if study is not None and not _is_uid(study):
            return self._refuse(request, 400, "study UID in the path is not a UID", peer)
        try:
            boundary = boundary_of(request.headers.get("content-type"))
        except UnsupportedMediaType:
            return self._refuse(request, 415, "content type", peer)
        except BadRequest:
            return self._refuse(request, 400, "multipart boundary", peer)
        limit = self.settings.max_request_mb * 1024 * 1024
        length = request.headers.get("content-length")
        if limit and length is not None and length.isdigit() and int(length) > limit:
            return self._refuse(request, 413, "request too large", peer)
        if self.receiver.spool.free_bytes() < self.receiver.min_free_bytes:
            metrics.observe_refused("out_of_space")
            logger.error(
                "spool below free-space floor", extra=log_fields("dicomweb.out_of_space", peer=peer)
            )
            return self._refuse(
                request, 503, "spool below its free-space floor", peer, {"Retry-After": "60"}
            )
        user = self.credentials.user if self.settings.auth == "basic" else ""
        audit.http_caller(accepted=True, user=user or "-", peer=peer, local=self._local())
        transfer = _Transfer(key=-next(self._keys), peer=peer, user=user, study=study)
        self.receiver.open_transfer(transfer.key)
        released = False
        status = 500
        try:
            status, body = await self._receive(request, boundary, transfer, limit)
            released = status in (200, 202, 409)
            if body is None:
                return Response(status_code=status)
            return Response(body, status_code=status, media_type=MEDIA_TYPE)
        finally:
            self._finish(transfer, released=released)
            self._log(request, status, peer, started=started, transfer=transfer)

    # -- the body ----------------------------------------------------------------------------
    async def _receive(
        self, request: Request, boundary: bytes, transfer: _Transfer, limit: int
    ) -> tuple[int, bytes | None]:
        """Read the body, storing each part once complete; (HTTP status, response body).

        A part is stored on the pool while the next one is read (one store at a time per
        request, in order); every store has ended before the answer is built."""
        try:
            verdict = await self._read_body(request, boundary, transfer, limit)
        finally:
            if transfer.pending is not None:  # the last part's store
                transfer.outcomes.append(await transfer.pending)
                transfer.pending = None
        outcomes = transfer.outcomes
        if verdict in (408, _CLIENT_GONE):
            return verdict, None  # nobody to answer, or a client that stalled
        if verdict is not None:
            return verdict, response_body(outcomes)
        if not outcomes:
            return 400, None  # no part at all
        if all(not o.stored and not o.sop_instance_uid for o in outcomes):
            return 400, response_body(outcomes)  # nothing in it was DICOM
        return http_status(outcomes), response_body(outcomes)

    async def _read_body(
        self, request: Request, boundary: bytes, transfer: _Transfer, limit: int
    ) -> int | None:
        """Read and parse the body, handing each complete part to :meth:`_store_part`;
        ``None`` once it ended with its closing boundary, else the status that ends it."""
        reader = PartReader(boundary, self.settings.max_instance_mb * 1024 * 1024)
        timeout = self.settings.network_timeout_seconds
        loop = asyncio.get_running_loop()
        receive = request.receive
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                return 408
            if message["type"] == "http.disconnect":
                return _CLIENT_GONE
            chunk = message.get("body", b"")
            transfer.received_bytes += len(chunk)
            if limit and transfer.received_bytes > limit:
                return 413
            try:
                parts = reader.feed(chunk)
            except BadRequest:
                return 400
            for part in parts:
                if transfer.pending is not None:
                    transfer.outcomes.append(await transfer.pending)
                transfer.pending = loop.run_in_executor(
                    self._pool, self._store_part, part, transfer
                )
            if not message.get("more_body", False):
                break
        try:
            reader.finish()
        except BadRequest:
            return 400
        return None

    def _store_part(self, part: Part, transfer: _Transfer) -> Outcome:
        """Store one complete part as a C-STORE; never raises."""
        meta = part.meta
        if part.problem is PartProblem.TOO_LARGE:
            metrics.observe_refused("too_large")
            return Outcome(
                meta.sop_class_uid if meta else "",
                meta.sop_instance_uid if meta else "",
                FAILURE_OUT_OF_RESOURCES,
            )
        if part.problem is not None or meta is None or part.dataset is None:
            metrics.observe_refused("not_dicom")
            logger.warning(
                "part refused",
                extra=log_fields(
                    "dicomweb.part_refused",
                    peer=transfer.peer,
                    part=part.index,
                    reason=part.problem.value if part.problem else "not_dicom",
                ),
            )
            return Outcome("", "", FAILURE_CANNOT_UNDERSTAND)
        failed = Outcome(meta.sop_class_uid, meta.sop_instance_uid, FAILURE_CANNOT_UNDERSTAND)
        if meta.transfer_syntax not in _TRANSFER_SYNTAXES:
            metrics.observe_refused("transfer_syntax")
            return Outcome(
                meta.sop_class_uid, meta.sop_instance_uid, FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED
            )
        if meta.sop_class_uid not in _STORAGE_CLASSES:
            metrics.observe_refused("sop_class")
            return Outcome(
                meta.sop_class_uid, meta.sop_instance_uid, FAILURE_SOP_CLASS_NOT_SUPPORTED
            )
        request = StoreRequest(
            calling_ae=CALLING_AE,
            peer=transfer.peer,
            assoc_key=transfer.key,
            transfer_syntax=UID(meta.transfer_syntax),
            sop_class_uid=meta.sop_class_uid,
            sop_instance_uid=meta.sop_instance_uid,
            dataset=part.dataset,
        )
        if transfer.study is not None and self._other_study(request, transfer.study):
            metrics.observe_refused("study_mismatch")
            logger.warning(
                "instance of another study",
                extra=log_fields(
                    "dicomweb.study_mismatch",
                    peer=transfer.peer,
                    sop=uid_ref(meta.sop_instance_uid),
                    study=uid_ref(transfer.study),
                ),
            )
            return Outcome(meta.sop_class_uid, meta.sop_instance_uid, FAILURE_DATASET_MISMATCH)
        studies: list[str] = []

        def tally(key: int, study_uid: str) -> None:
            studies.append(study_uid)
            self.receiver.tally(key, study_uid)

        r = self.receiver
        try:
            status = store_instance(
                request, r.spool, r.index, lambda: r.min_free_bytes, r.clock, tally, r.copies
            )
        except Exception:  # store_instance never raises; belt and braces
            logger.exception("store failed", extra=log_fields("dicomweb.store_failed"))
            return failed
        if status == STATUS_SUCCESS:
            return Outcome(
                meta.sop_class_uid, meta.sop_instance_uid, None, studies[0] if studies else ""
            )
        return Outcome(meta.sop_class_uid, meta.sop_instance_uid, failure_reason(status))

    @staticmethod
    def _other_study(request: StoreRequest, study: str) -> bool:
        """Whether the instance belongs to a study other than ``study`` (PS3.18 10.5.1: it
        is then not stored). An instance that cannot be read is left to
        :func:`store_instance`, which refuses and quarantines it."""
        try:
            ds = file_limits.read_dataset(
                request.dataset, request.transfer_syntax, file_limits.active()
            )
            own = text_value(getter(ds, request.transfer_syntax), "StudyInstanceUID")
        except Exception:
            return False
        finally:
            request.dataset.seek(0)
        return bool(own) and own != study

    # -- the end -----------------------------------------------------------------------------
    def _finish(self, transfer: _Transfer, *, released: bool) -> None:
        """End the transfer (early-close mark when answered) and audit its studies."""
        try:
            per_study = self.receiver.close_transfer(transfer.key, released=released)
        except Exception:
            logger.exception("could not end transfer", extra=log_fields("dicomweb.end_failed"))
            return
        for study_uid, count in (per_study or {}).items():
            audit.instances_transferred(
                received=True,
                study_uid=study_uid,
                count=count,
                source_ae=CALLING_AE,
                source_address=transfer.peer,
                destination_ae=self.ae_title,
                destination_address=self._local(),
            )

    def _log(
        self,
        request: Request,
        status: int,
        peer: str,
        *,
        started: float,
        transfer: _Transfer | None = None,
        reason: str | None = None,
    ) -> None:
        """The access log line: method, path (no query), status, counts; never the body."""
        metrics.observe_http_request(status)
        path = request.url.path
        study = request.path_params.get("study")
        if study is not None:  # UIDs appear in logs as keyed hashes only (dicomai.logs)
            path = f"{self.settings.path}/studies/{{study}}"
        fields: dict[str, Any] = {
            "method": request.method,
            "path": path,
            "status": status,
            "peer": peer,
            "seconds": round(time.monotonic() - started, 3),
        }
        if study is not None:
            fields["study"] = uid_ref(study)
        if transfer is not None:
            fields.update(
                stored=sum(1 for o in transfer.outcomes if o.stored),
                failed=sum(1 for o in transfer.outcomes if not o.stored),
                bytes=transfer.received_bytes,
            )
        if reason:
            fields["reason"] = reason
        level = logging.INFO if status < 400 else logging.WARNING
        logger.log(level, "DICOMweb request", extra=log_fields("dicomweb.request", **fields))
