"""Result objects sent over DICOMweb: one STOW-RS request per destination, an outcome per
object from the store response."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pydicom

from dicomai.config import DestinationSettings
from dicomai.delivery import stow_client
from dicomai.delivery.transport import SendCancel, SendItem, SendReport
from dicomai.jobs.policy import SendOutcome
from dicomai.logs import log_fields

__all__ = ["send_objects_stow"]

logger = logging.getLogger(__name__)

_VERDICT = {
    stow_client.Verdict.STORED: SendOutcome.SENT,
    stow_client.Verdict.RETRY: SendOutcome.RETRY,
    stow_client.Verdict.REFUSED: SendOutcome.REFUSED,
}


def send_objects_stow(
    dest: DestinationSettings,
    items: Sequence[SendItem],
    *,
    target: stow_client.StowTarget,
    cancel: SendCancel | None = None,
) -> SendReport:
    """Send files to a DICOMweb destination in one STOW-RS request; outcomes per object."""
    report = SendReport()
    datasets: list[pydicom.Dataset] = []
    by_uid: dict[str, SendItem] = {}
    for item in items:
        try:
            ds = pydicom.dcmread(item.path)
            uid = str(ds.SOPInstanceUID)
        except Exception as exc:  # a result file that cannot be read now may be later
            report.outcomes[item.result_id] = (SendOutcome.RETRY, None, type(exc).__name__)
            continue
        datasets.append(ds)
        by_uid[uid] = item
    if not datasets:
        report.error = "no readable result file"
        return report
    result = stow_client.store(
        target, datasets, cancelled=(lambda: cancel.cancelled) if cancel else None
    )
    report.error = result.error
    for uid, item in by_uid.items():
        v = result.instances[uid]
        if v.verdict is stow_client.Verdict.CLASS_REFUSED:
            outcome = SendOutcome.SKIPPED if item.optional else SendOutcome.REFUSED
        else:
            outcome = _VERDICT[v.verdict]
        error = None if outcome is SendOutcome.SENT else (v.detail or result.error)
        report.outcomes[item.result_id] = (outcome, v.reason, error)
    if result.auth_problem:
        logger.warning(
            "DICOMweb destination refused our credentials or they cannot be read",
            extra=log_fields(
                "send.auth_problem",
                destination=dest.name,
                http_status=result.http_status,
                error=result.error,
            ),
        )
    return report
