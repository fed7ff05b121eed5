"""One STOW-RS request's body: read as it streams in (:mod:`dicomai.ingest.stow_parts`),
never whole, and each complete part stored exactly as a C-STORE would be.

A part becomes a :class:`~dicomai.ingest.fast_store.StoreRequest` from its file meta (calling
AE ``DICOMWEB``, the client's address as peer) passed to
:func:`~dicomai.ingest.store_instance.store_instance` with the DIMSE receiver's spool, index,
free-space floor and copy flusher (durable before the answer, duplicates answered as stored,
quarantine and file limits). Parts are stored on a small thread pool, one at a time per
request and in order, while the next one is read, so the event loop keeps serving other
requests.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.presentation import StoragePresentationContexts
from starlette.requests import Request

import dicomai.ingest.file_limits as file_limits
from dicomai import metrics
from dicomai.config import DicomWebSettings
from dicomai.ingest.fast_store import StoreRequest
from dicomai.ingest.record import getter, text_value
from dicomai.ingest.scp import Receiver
from dicomai.ingest.storage_ae import TRANSFER_SYNTAXES
from dicomai.ingest.store_instance import STATUS_SUCCESS, store_instance
from dicomai.ingest.stow_parts import BadRequest, Part, PartProblem, PartReader
from dicomai.ingest.stow_response import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_DATASET_MISMATCH,
    FAILURE_OUT_OF_RESOURCES,
    FAILURE_SOP_CLASS_NOT_SUPPORTED,
    FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED,
    Outcome,
    failure_reason,
    http_status,
    response_body,
)
from dicomai.logs import log_fields, uid_ref

__all__ = ["CALLING_AE", "CLIENT_GONE", "StowBody", "StowTransfer"]

logger = logging.getLogger(__name__)

#: The calling AE title recorded for instances received over DICOMweb.
CALLING_AE = "DICOMWEB"
#: Status logged and counted for a client that went away before its answer.
CLIENT_GONE = 499
_TRANSFER_SYNTAXES = frozenset(str(ts) for ts in TRANSFER_SYNTAXES)
_STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in StoragePresentationContexts)


@dataclass(slots=True)
class StowTransfer:
    """One STOW-RS request's state while its body streams in."""

    key: int
    peer: str
    user: str
    study: str | None
    outcomes: list[Outcome] = field(default_factory=list)
    received_bytes: int = 0
    #: The store of the part before the one being read (at most one per request).
    pending: asyncio.Future[Outcome] | None = None


class StowBody:
    """Reads request bodies and stores their parts through ``receiver``.

    :meth:`start` makes the thread pool parts are stored on (at most ``max_workers``
    stores at once, over all requests); :meth:`stop` waits for the stores in progress.
    """

    def __init__(self, settings: DicomWebSettings, receiver: Receiver) -> None:
        self.settings = settings
        self.receiver = receiver
        self._pool: ThreadPoolExecutor | None = None

    def start(self, max_workers: int) -> None:
        """Make the pool parts are stored on."""
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="stow-store")

    def stop(self) -> None:
        """Wait for the stores in progress and drop the pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool = None

    async def receive(
        self, request: Request, boundary: bytes, transfer: StowTransfer, limit: int
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
        if verdict in (408, CLIENT_GONE):
            return verdict, None  # nobody to answer, or a client that stalled
        if verdict is not None:
            return verdict, response_body(outcomes)
        if not outcomes:
            return 400, None  # no part at all
        if all(not o.stored and not o.sop_instance_uid for o in outcomes):
            return 400, response_body(outcomes)  # nothing in it was DICOM
        return http_status(outcomes), response_body(outcomes)

    async def _read_body(
        self, request: Request, boundary: bytes, transfer: StowTransfer, limit: int
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
                return CLIENT_GONE
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

    def _store_part(self, part: Part, transfer: StowTransfer) -> Outcome:
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
            self.receiver.transfers.tally(key, study_uid)

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
