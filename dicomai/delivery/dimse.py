"""Result objects sent over DIMSE: one association per destination, one C-STORE per file."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from dicomai.config import DestinationSettings
from dicomai.delivery.transport import SendCancel, SendItem, SendReport
from dicomai.jobs.policy import SendOutcome

__all__ = ["classify_status", "send_objects"]

logger = logging.getLogger(__name__)


def classify_status(status: int | None) -> SendOutcome:
    """0x0000 and 0xB0xx are success; 0xA7xx retryable; anything else permanent."""
    if status is None:
        return SendOutcome.RETRY
    if status == 0x0000 or (status & 0xF000) == 0xB000:
        return SendOutcome.SENT
    if (status & 0xFF00) == 0xA700:
        return SendOutcome.RETRY
    return SendOutcome.REFUSED


def send_objects(
    dest: DestinationSettings,
    items: Sequence[SendItem],
    *,
    calling_ae: str,
    timeout: float,
    cancel: SendCancel | None = None,
) -> SendReport:
    """Send files to ``dest`` over one association with exactly the contexts needed."""
    report = SendReport()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({i.sop_class_uid for i in items}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if cancel is not None and cancel.cancelled:
        report.error = "not sent: shutting down"
        for item in items:
            report.outcomes[item.result_id] = (SendOutcome.RETRY, None, report.error)
        return report
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, cancel.track)] if cancel is not None else []
    try:
        assoc = ae.associate(
            dest.host, int(dest.port or 0), ae_title=dest.ae_title, evt_handlers=handlers
        )
    except Exception as exc:  # socket errors surface in several types
        report.error = f"association failed: {type(exc).__name__}"
        for item in items:
            report.outcomes[item.result_id] = (SendOutcome.RETRY, None, report.error)
        ae.shutdown()
        return report
    try:
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "aborted or unreachable"
            report.error = f"association {reason}"
            # A rejection by the peer (wrong AE title) is configuration: retrying may help once
            # the PACS admin fixes it, so it stays retryable until send attempts run out.
            for item in items:
                report.outcomes[item.result_id] = (SendOutcome.RETRY, None, report.error)
            return report
        for item in items:
            try:
                ds = pydicom.dcmread(item.path)
                status_ds = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context for the SOP class
                outcome = SendOutcome.SKIPPED if item.optional else SendOutcome.REFUSED
                report.outcomes[item.result_id] = (
                    outcome,
                    None,
                    f"SOP class not accepted: {exc}"[:300],
                )
                continue
            except Exception as exc:
                report.outcomes[item.result_id] = (SendOutcome.RETRY, None, type(exc).__name__)
                continue
            status = int(status_ds.Status) if status_ds and "Status" in status_ds else None
            outcome = classify_status(status)
            error = (
                None
                if outcome is SendOutcome.SENT
                else ("no response" if status is None else f"status 0x{status:04X}")
            )
            report.outcomes[item.result_id] = (outcome, status, error)
            if status is None and not assoc.is_established:
                break
        for item in items:
            report.outcomes.setdefault(
                item.result_id, (SendOutcome.RETRY, None, "association lost")
            )
        if assoc.is_established:
            assoc.release()
    finally:
        if cancel is not None:
            cancel.forget(assoc)
        ae.shutdown()
    return report
