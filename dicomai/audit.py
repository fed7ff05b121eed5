"""Audit trail: DICOM PS3.15 / IHE ATNA style events as JSON lines (and optionally syslog).

Events carry AE titles, addresses, study UIDs and counts, never patient demographics.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "OUTCOME_MAJOR_FAILURE",
    "OUTCOME_MINOR_FAILURE",
    "OUTCOME_SUCCESS",
    "association",
    "configure",
    "http_caller",
    "instances_transferred",
    "security_alert",
]

_LOGGER = logging.getLogger("dicomai.audit")
_LOGGER.propagate = False

OUTCOME_SUCCESS = 0
OUTCOME_MINOR_FAILURE = 4
OUTCOME_SERIOUS_FAILURE = 8
OUTCOME_MAJOR_FAILURE = 12

_SOURCE = {"AuditSourceID": socket.gethostname(), "AuditEnterpriseSiteID": "dicomai"}


def _code(value: str, meaning: str, scheme: str = "DCM") -> dict[str, str]:
    return {"code": value, "scheme": scheme, "meaning": meaning}


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return (
            json.dumps(record.msg, default=str) if isinstance(record.msg, dict) else str(record.msg)
        )


def configure(
    file: Path | None,
    *,
    syslog: bool = False,
    syslog_address: str = "/dev/log",
    site: str = "dicomai",
) -> None:
    """Send audit events to ``file`` (JSON lines) and optionally to syslog (RFC 5424 facility
    auth). Idempotent: earlier handlers are replaced."""
    for old in list(_LOGGER.handlers):
        _LOGGER.removeHandler(old)
        old.close()
    _SOURCE["AuditEnterpriseSiteID"] = site
    _LOGGER.setLevel(logging.INFO)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
        handler.setFormatter(_JsonLines())
        _LOGGER.addHandler(handler)
    if syslog:
        sys_handler = logging.handlers.SysLogHandler(
            address=syslog_address, facility=logging.handlers.SysLogHandler.LOG_AUTH
        )
        sys_handler.setFormatter(_JsonLines())
        _LOGGER.addHandler(sys_handler)
    if not _LOGGER.handlers:
        _LOGGER.addHandler(logging.NullHandler())


def _participant(
    ae_title: str, address: str, *, requestor: bool, role: dict[str, str] | None
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "UserID": f"AE={ae_title}",
        "AlternativeUserID": ae_title,
        "UserIsRequestor": requestor,
        "NetworkAccessPointID": address,
        "NetworkAccessPointTypeCode": "2",
    }
    if role:
        item["RoleIDCode"] = role
    return item


def _emit(
    event_id: dict[str, str],
    action: str,
    outcome: int,
    participants: Sequence[dict[str, Any]],
    objects: Sequence[dict[str, Any]] = (),
    event_type: dict[str, str] | None = None,
    description: str | None = None,
) -> None:
    record: dict[str, Any] = {
        "EventIdentification": {
            "EventID": event_id,
            "EventActionCode": action,
            "EventDateTime": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": outcome,
        },
        "ActiveParticipant": list(participants),
        "AuditSourceIdentification": dict(_SOURCE),
    }
    if event_type:
        record["EventIdentification"]["EventTypeCode"] = event_type
    if description:
        record["EventIdentification"]["EventOutcomeDescription"] = description
    if objects:
        record["ParticipantObjectIdentification"] = list(objects)
    _LOGGER.info(record)


def association(
    *,
    accepted: bool,
    calling_ae: str,
    called_ae: str,
    peer: str,
    local: str,
    reason: str | None = None,
) -> None:
    """An association was accepted or rejected (User Authentication / Login)."""
    _emit(
        _code("110114", "User Authentication"),
        "E",
        OUTCOME_SUCCESS if accepted else OUTCOME_MINOR_FAILURE,
        [
            _participant(calling_ae, peer, requestor=True, role=None),
            _participant(called_ae, local, requestor=False, role=None),
        ],
        event_type=_code("110122", "Login"),
        description=reason,
    )


def http_caller(
    *, accepted: bool, user: str, peer: str, local: str, reason: str | None = None
) -> None:
    """An HTTP (DICOMweb) request was let in or turned away at the door (User Authentication
    / Login, as for an association): ``user`` is the authenticated user name, or ``-``."""
    caller = {
        "UserID": user or "-",
        "UserIsRequestor": True,
        "NetworkAccessPointID": peer,
        "NetworkAccessPointTypeCode": "2",
    }
    server = {
        "UserID": "DICOMweb",
        "UserIsRequestor": False,
        "NetworkAccessPointID": local,
        "NetworkAccessPointTypeCode": "2",
    }
    _emit(
        _code("110114", "User Authentication"),
        "E",
        OUTCOME_SUCCESS if accepted else OUTCOME_MINOR_FAILURE,
        [caller, server],
        event_type=_code("110122", "Login"),
        description=reason,
    )


def _study(study_uid: str, count: int) -> dict[str, Any]:
    return {
        "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3",
        "ParticipantObjectIDTypeCode": _code("110180", "Study Instance UID"),
        "ParticipantObjectID": study_uid,
        "ParticipantObjectDetail": {"NumberOfInstances": count},
    }


def instances_transferred(
    *,
    received: bool,
    study_uid: str,
    count: int,
    source_ae: str,
    source_address: str,
    destination_ae: str,
    destination_address: str,
    outcome: int = OUTCOME_SUCCESS,
    reason: str | None = None,
) -> None:
    """DICOM Instances Transferred: a study received (action C) or results sent (action R)."""
    _emit(
        _code("110104", "DICOM Instances Transferred"),
        "C" if received else "R",
        outcome,
        [
            _participant(
                source_ae,
                source_address,
                requestor=not received,
                role=_code("110153", "Source Role ID"),
            ),
            _participant(
                destination_ae,
                destination_address,
                requestor=received,
                role=_code("110152", "Destination Role ID"),
            ),
        ],
        [_study(study_uid, count)],
        description=reason,
    )


def security_alert(*, reason: str, peer: str, calling_ae: str = "") -> None:
    """Security Alert: a refused connection or object (reason is our short code)."""
    _emit(
        _code("110113", "Security Alert"),
        "E",
        OUTCOME_MINOR_FAILURE,
        [_participant(calling_ae or "-", peer, requestor=True, role=None)],
        description=reason,
    )
