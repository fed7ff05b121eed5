"""The DICOMweb STOW-RS receiver: an HTTP server beside the DIMSE one (``[dicomweb]``).

``POST {path}/studies`` and ``POST {path}/studies/{study}`` take a ``multipart/related;
type="application/dicom"`` body, one Part 10 file per part. The body is read as it streams
in, never whole, and each complete part is stored exactly as a C-STORE would be
(:mod:`dicomai.ingest.stow_body`). A request is a transfer of the DIMSE receiver
(:class:`~dicomai.ingest.transfers.Transfers`): its instances are tallied per study and
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
from datetime import datetime
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dicomai import audit, metrics
from dicomai.config import DicomWebSettings, Settings
from dicomai.http_auth import HttpCredentials, SecretUnavailable, credentials
from dicomai.ingest.scp import Receiver
from dicomai.ingest.stow_body import CALLING_AE, StowBody, StowTransfer
from dicomai.ingest.stow_parts import BadRequest, UnsupportedMediaType, boundary_of
from dicomai.ingest.stow_response import MEDIA_TYPE
from dicomai.logs import log_fields, uid_ref

__all__ = ["DicomWebReceiver"]

logger = logging.getLogger(__name__)

_UID_CHARS = frozenset("0123456789.")
_REALM = 'realm="dicomai"'


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
        #: Reads request bodies and stores their parts.
        self.body = StowBody(s, receiver)
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
        self.body.start(max_workers=min(8, s.max_connections))
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
        self.body.stop()
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = None
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
        transfer = StowTransfer(key=-next(self._keys), peer=peer, user=user, study=study)
        self.receiver.transfers.open(transfer.key)
        released = False
        status = 500
        try:
            status, body = await self.body.receive(request, boundary, transfer, limit)
            released = status in (200, 202, 409)
            if body is None:
                return Response(status_code=status)
            return Response(body, status_code=status, media_type=MEDIA_TYPE)
        finally:
            self._finish(transfer, released=released)
            self._log(request, status, peer, started=started, transfer=transfer)

    # -- the body ----------------------------------------------------------------------------
    # -- the end -----------------------------------------------------------------------------
    def _finish(self, transfer: StowTransfer, *, released: bool) -> None:
        """End the transfer (early-close mark when answered) and audit its studies."""
        try:
            per_study = self.receiver.transfers.close(transfer.key, released=released)
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
        transfer: StowTransfer | None = None,
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
