"""Our Storage SCP's AE: its implementation identity, the presentation contexts it accepts
(every storage SOP class in :data:`TRANSFER_SYNTAXES`, and Verification), the timeouts and
PDU size of ``[receiver]``, and the supported contexts copied cheaply for each association."""

from __future__ import annotations

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
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext, StoragePresentationContexts

from dicomai import __version__
from dicomai.config import ReceiverSettings

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "TRANSFER_SYNTAXES",
    "VERIFICATION",
    "SupportedContexts",
    "make_ae",
]

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1.71"
IMPLEMENTATION_VERSION_NAME = f"DICOMAI_{__version__}"[:16]
#: The Verification SOP Class (C-ECHO).
VERIFICATION = UID("1.2.840.10008.1.1")

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


def make_ae(settings: ReceiverSettings) -> AE:
    """The AE of ``[receiver]``: its title, the calling AE titles it accepts, its limits and
    timeouts, and its supported contexts."""
    s = settings
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


def _copy_context(cx: PresentationContext) -> PresentationContext:
    """A copy of a presentation context as independent as ``deepcopy``'s: its attributes are
    ints, bools, ``None``, UIDs (immutable) and the list of transfer syntax UIDs."""
    new = PresentationContext.__new__(PresentationContext)
    new.__dict__ = {k: (list(v) if isinstance(v, list) else v) for k, v in cx.__dict__.items()}
    return new


class SupportedContexts(list[PresentationContext]):
    """The server's supported contexts; pynetdicom deep-copies them for every association.

    ``deepcopy`` rebuilds every UID through pydicom's validating constructor (about 1,500 per
    association with our ~120 storage contexts), a large part of a new association's set-up.
    This copies them cheaply (and as deeply: see :func:`_copy_context`)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [_copy_context(cx) for cx in self]
