"""The STOW-RS response: the PS3.18 Store Instances Response data set and the HTTP status.

Each part's outcome is kept as an :class:`Outcome`: stored (a DIMSE success, duplicates
included: the instance is held) or failed with the DIMSE status the store gave, mapped to a
PS3.18 Failure Reason by :func:`failure_reason`. :func:`response_body` writes the response data
set in the DICOM JSON model (``application/dicom+json``, PS3.18 F.2): Referenced SOP Sequence
for what was stored, Failed SOP Sequence with a Failure Reason for what was not, and
:func:`http_status` picks the status of PS3.18 10.5.3: 200 all stored, 202 some failed, 409
all failed (503 when every failure was a lack of resources: the client should retry).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "FAILURE_CANNOT_UNDERSTAND",
    "FAILURE_DATASET_MISMATCH",
    "FAILURE_OUT_OF_RESOURCES",
    "FAILURE_PROCESSING",
    "FAILURE_SOP_CLASS_NOT_SUPPORTED",
    "FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED",
    "MEDIA_TYPE",
    "Outcome",
    "failure_reason",
    "http_status",
    "response_body",
]

MEDIA_TYPE = "application/dicom+json"

#: Failure Reasons (PS3.18 10.5.3, codes of PS3.4 Annex B / PS3.7 C).
FAILURE_PROCESSING = 0x0110
FAILURE_SOP_CLASS_NOT_SUPPORTED = 0x0122
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_DATASET_MISMATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

_SPECIFIC_CHARACTER_SET = "00080005"
_RETRIEVE_URL = "00081190"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_CLASS = "00081150"
_REFERENCED_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"


def failure_reason(status: int) -> int:
    """The PS3.18 Failure Reason for a DIMSE C-STORE failure status of ours.

    Out of resources (A7xx) and "data set does not match SOP class" (A9xx) keep their code;
    "cannot understand" (Cxxx: undecodable, beyond a file limit) is reported as C000, as is a
    transfer syntax we do not take except that C122 keeps its own meaning; 0122 (SOP class
    not supported) is kept; anything else is a processing failure (0110).
    """
    if 0xA700 <= status <= 0xA7FF:
        return status
    if 0xA900 <= status <= 0xA9FF:
        return FAILURE_DATASET_MISMATCH
    if status == FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED:
        return status
    if 0xC000 <= status <= 0xCFFF:
        return FAILURE_CANNOT_UNDERSTAND
    if status == FAILURE_SOP_CLASS_NOT_SUPPORTED:
        return status
    return FAILURE_PROCESSING


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one part."""

    sop_class_uid: str
    sop_instance_uid: str
    #: ``None``: stored (or already held); else the Failure Reason.
    failure: int | None = None
    #: The instance's study (known once stored: for the audit and the release).
    study_uid: str = ""

    @property
    def stored(self) -> bool:
        return self.failure is None


def _uid(value: str) -> dict[str, object]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _item(o: Outcome) -> dict[str, object]:
    item: dict[str, object] = {
        _REFERENCED_SOP_CLASS: _uid(o.sop_class_uid),
        _REFERENCED_SOP_INSTANCE: _uid(o.sop_instance_uid),
    }
    if o.failure is not None:
        item[_FAILURE_REASON] = {"vr": "US", "Value": [o.failure]}
    return item


def response_body(outcomes: Sequence[Outcome], retrieve_url: str | None = None) -> bytes:
    """The Store Instances Response data set (DICOM JSON), sequences in tag order.

    The Failed SOP Sequence is present when something failed, the Referenced SOP Sequence
    when something was stored (PS3.18 Table 10.5.3-2); ``retrieve_url`` (the study's URL)
    is optional and left out by default: this server offers no WADO-RS."""
    body: dict[str, object] = {_SPECIFIC_CHARACTER_SET: {"vr": "CS", "Value": ["ISO_IR 192"]}}
    failed = [o for o in outcomes if not o.stored]
    stored = [o for o in outcomes if o.stored]
    if retrieve_url:
        body[_RETRIEVE_URL] = {"vr": "UR", "Value": [retrieve_url]}
    if failed:
        body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_item(o) for o in failed]}
    if stored:
        body[_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_item(o) for o in stored]}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def http_status(outcomes: Sequence[Outcome]) -> int:
    """200 all stored, 202 some stored and some failed, 409 all failed; 503 when all failed
    and every failure was a lack of resources (out of space, database unavailable), which a
    client should retry later. A body without any part is the caller's 400."""
    failed = [o for o in outcomes if not o.stored]
    if not failed:
        return 200
    if len(failed) < len(outcomes):
        return 202
    if all(0xA700 <= (o.failure or 0) <= 0xA7FF for o in failed):
        return 503
    return 409
