"""C-STORE requests that reach pynetdicom's DIMSE layer (``fast_store = false``, or a request
the fast path leaves to pynetdicom) answered as a Storage SCP must, where pynetdicom would not.

pynetdicom 3.0.4 drops a request missing a mandatory parameter without any response (an
empty Affected SOP Instance UID reads as none), aborts the association when the Affected SOP
Class UID names no SOP class it knows, and otherwise serves the request whatever context it
arrived on. Such a request is served here as the fast path serves it; every other one is
left to pynetdicom (EVT_C_STORE, :func:`dicomai.ingest.store_instance.handle_store`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext

from dicomai.ingest import pynetdicom_seam as seam
from dicomai.ingest.fast_store import StoreRequest
from dicomai.ingest.store_instance import STATUS_OUT_OF_RESOURCES
from dicomai.logs import log_fields

__all__ = ["guard_store_requests"]

logger = logging.getLogger(__name__)


def guard_store_requests(assoc: Any, store: Callable[[StoreRequest], int]) -> None:
    """Answer every C-STORE-RQ that reaches pynetdicom's DIMSE layer as the fast path does:
    those of :func:`_misfit_store` by :func:`_answer_store`, the others by pynetdicom."""

    def guarded(serve_request: Callable[[Any, int], None], msg: Any, context_id: int) -> None:
        context = _misfit_store(assoc, msg, context_id)
        if context is None:
            serve_request(msg, context_id)
        else:
            _answer_store(assoc, msg, context, store)

    seam.wrap_serve_request(assoc, guarded)


def _misfit_store(assoc: Any, msg: Any, context_id: int) -> PresentationContext | None:
    """The accepted context of a C-STORE-RQ that pynetdicom would not answer as a Storage
    SCP must (see the module docstring), else ``None`` (pynetdicom's own handling is right)."""
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
    :func:`~dicomai.ingest.store_instance.check_command` refuses, as on the fast path) and
    send its C-STORE-RSP."""
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
