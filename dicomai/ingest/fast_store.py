"""C-STORE requests served straight from their P-DATA-TF PDUs (the receiver's fast path).

For every C-STORE, pynetdicom decodes each P-DATA-TF PDU into objects, copies its fragments
into a message buffer, decodes the command set into a pydicom dataset, hands the message to
the association thread, builds the response primitive, encodes its command set with pydicom
again and hands it back to the network (DUL) thread to send: about as much interpreter time
per image as storing it durably, and two thread switches.

:class:`FastStore` serves the P-DATA-TF PDUs of C-STORE requests on the network thread
instead; :class:`dicomai.ingest.pdu_reader.PduReader` offers it every P-DATA-TF PDU it reads
in the established state (Sta6):

- a message starts on the fast path only when pynetdicom holds no partial message, the PDU
  begins with a complete C-STORE-RQ command set with a data set, and the presentation context
  was accepted with us as SCP, on an association pynetdicom has marked established (it does
  so just after sending the A-ASSOCIATE-AC: a first C-STORE arriving before that is served by
  pynetdicom, after establishment). Anything else (C-ECHO, an unexpected command, a command
  split over PDUs, a release in progress) is left to pynetdicom, which answers it;
- a C-STORE-RQ whose Affected SOP Class UID is not the context's abstract syntax, or whose
  Affected SOP Class or Instance UID is empty or absent, is taken here too: ``serve`` refuses
  it (with the context's abstract syntax in :attr:`StoreRequest.context_sop_class`) and the
  refusal is answered like any other status (the receiver answers those that reach
  pynetdicom the same way, see :mod:`dicomai.ingest.scp`);
- the data set fragments are kept as views of the received PDUs and joined once; the request
  is passed to ``serve`` (:func:`dicomai.ingest.store_instance.store_instance`) on the
  network thread, and the C-STORE-RSP is encoded here (Implicit VR Little Endian command
  set, one PDV) and sent.

A PDV that breaks the message (a command fragment or another context inside a data set,
data after the last fragment, a malformed item) raises :class:`ProtocolError`; the reader
then has the association aborted as for any invalid PDU. ``EVT_C_STORE`` and the DIMSE
events are not triggered for the requests served here.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.uid import UID

from dicomai.ingest import pynetdicom_seam as seam

__all__ = [
    "FastStore",
    "ProtocolError",
    "StoreCommand",
    "StoreRequest",
    "encode_store_response",
    "parse_command",
    "parse_pdvs",
    "uid_value",
]

logger = logging.getLogger(__name__)

_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101
_PDV_COMMAND = 0x01
_PDV_LAST = 0x02
#: Status pynetdicom answers when a C-STORE handler raises.
_STATUS_HANDLER_FAILED = 0xC211


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One received C-STORE: who sent it, under which transfer syntax, and its dataset bytes
    exactly as encoded by the peer."""

    calling_ae: str
    peer: str
    #: Identifies the association (for per-association bookkeeping).
    assoc_key: int
    transfer_syntax: UID
    sop_class_uid: str
    sop_instance_uid: str
    dataset: BytesIO
    #: The abstract syntax of the presentation context the request arrived on: a request
    #: whose Affected SOP Class UID differs is refused. ``None``: not known here (the
    #: caller vouches for the SOP class).
    context_sop_class: str | None = None


@dataclass(frozen=True, slots=True)
class StoreCommand:
    """The fields of a C-STORE-RQ command set the fast path needs."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


class ProtocolError(Exception):
    """A P-DATA-TF PDU that breaks the DIMSE message it belongs to."""


def parse_pdvs(body: bytes | bytearray) -> list[tuple[int, int, memoryview]] | None:
    """The presentation data values of a P-DATA-TF PDU body as (context ID, message control
    header, fragment view) tuples; ``None`` when an item is malformed."""
    view = memoryview(body)
    items = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            return None
        (length,) = struct.unpack_from(">I", body, offset)
        if length < 2 or offset + 4 + length > end:
            return None
        items.append((body[offset + 4], body[offset + 5], view[offset + 6 : offset + 4 + length]))
        offset += 4 + length
    return items or None


def _uid(value: bytes | memoryview) -> str:
    return bytes(value).rstrip(b"\x00 ").decode("ascii")


def parse_command(data: bytes | memoryview) -> StoreCommand | None:
    """A complete command set (Implicit VR Little Endian, group 0000) if it is a C-STORE-RQ
    with a dataset, else ``None`` (including any encoding oddity: pynetdicom then decides).

    An empty or absent Affected SOP Class or Instance UID reads as ``""``: the request is
    still a C-STORE-RQ, which the store step refuses (and which must be answered)."""
    raw = bytes(data)
    values: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    try:
        while offset < end:
            group, element, length = struct.unpack_from("<HHI", raw, offset)
            offset += 8
            if group != 0x0000 or offset + length > end:
                return None
            values[element] = raw[offset : offset + length]
            offset += length
        if (
            struct.unpack("<H", values[0x0100])[0] != _C_STORE_RQ
            or struct.unpack("<H", values[0x0800])[0] == _NO_DATASET
        ):
            return None
        return StoreCommand(
            message_id=struct.unpack("<H", values[0x0110])[0],
            sop_class_uid=_uid(values.get(0x0002, b"")),
            sop_instance_uid=_uid(values.get(0x1000, b"")),
        )
    except (KeyError, struct.error, UnicodeDecodeError):
        return None


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def uid_value(uid: str) -> bytes:
    """A UID as a DICOM UI value: ASCII, padded with one NUL to an even length."""
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_store_response(command: StoreCommand, status: int) -> bytes:
    """The C-STORE-RSP command set (Implicit VR Little Endian) for ``command``.

    The Affected SOP Class and Instance UIDs are optional in a response (PS3.7: equal to the
    request's where present); one the request had empty is left out."""
    body = b"".join(
        (
            _element(0x0002, uid_value(command.sop_class_uid)) if command.sop_class_uid else b"",
            _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
            _element(0x0120, struct.pack("<H", command.message_id)),
            _element(0x0800, struct.pack("<H", _NO_DATASET)),
            _element(0x0900, struct.pack("<H", status)),
            _element(0x1000, uid_value(command.sop_instance_uid))
            if command.sop_instance_uid
            else b"",
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


@dataclass(slots=True)
class _Message:
    """A C-STORE request whose dataset is being received."""

    context_id: int
    transfer_syntax: UID
    #: The context's abstract syntax (the request is refused when its SOP class differs).
    abstract_syntax: str
    command: StoreCommand
    fragments: list[memoryview] = field(default_factory=list)


class FastStore:
    """The fast path of one acceptor association (see the module docstring).

    ``serve`` stores a request and returns its DIMSE status; it runs on the association's
    network thread. :attr:`served` counts the requests answered here.
    """

    def __init__(self, assoc: Any, serve: Callable[[StoreRequest], int]) -> None:
        self.assoc = assoc
        self.serve = serve
        self.served = 0
        self._message: _Message | None = None

    def reset(self) -> None:
        """Forget a message in progress (another PDU type came, e.g. an A-ABORT)."""
        self._message = None

    def take(self, body: bytes | bytearray) -> bool:
        """Serve this P-DATA-TF PDU body here (True) or leave it to pynetdicom (False)."""
        items = parse_pdvs(body)
        if items is None:
            if self._message is not None:
                raise ProtocolError("malformed PDV in a C-STORE dataset")
            return False
        if self._message is None:
            message = self._start(items[0])
            if message is None:
                return False
            self._message = message
            items = items[1:]
        message = self._message
        for i, (context_id, control, data) in enumerate(items):
            if control & _PDV_COMMAND or context_id != message.context_id:
                self._message = None
                raise ProtocolError("unexpected PDV in a C-STORE dataset")
            message.fragments.append(data)
            if control & _PDV_LAST:
                if i != len(items) - 1:
                    self._message = None
                    raise ProtocolError("data after the last fragment of a C-STORE dataset")
                self._message = None
                self._finish(message)
        return True

    def _start(self, item: tuple[int, int, memoryview]) -> _Message | None:
        """The message a PDV starts on the fast path, or ``None`` (pynetdicom's then)."""
        context_id, control, data = item
        assoc = self.assoc
        if (control & (_PDV_COMMAND | _PDV_LAST)) != (_PDV_COMMAND | _PDV_LAST):
            return None
        if seam.reassembling(assoc) or seam.release_started(assoc) or not assoc.is_established:
            return None
        context = seam.accepted_context(assoc, context_id)
        if context is None or not context.as_scp or not context.transfer_syntax:
            return None
        command = parse_command(data)
        if command is None:
            return None
        return _Message(
            context_id, UID(str(context.transfer_syntax[0])), str(context.abstract_syntax), command
        )

    def _finish(self, message: _Message) -> None:
        assoc = self.assoc
        dataset = BytesIO(b"".join(message.fragments))
        message.fragments.clear()
        request = StoreRequest(
            calling_ae=assoc.requestor.ae_title.strip(),
            peer=str(assoc.requestor.address),
            assoc_key=id(assoc),
            transfer_syntax=message.transfer_syntax,
            sop_class_uid=message.command.sop_class_uid,
            sop_instance_uid=message.command.sop_instance_uid,
            dataset=dataset,
            context_sop_class=message.abstract_syntax,
        )
        try:
            status = self.serve(request)
        except Exception:  # answered as pynetdicom answers a handler that raised
            logger.exception("C-STORE fast path: store failed")
            status = _STATUS_HANDLER_FAILED
        if not assoc.is_established:
            return
        command = encode_store_response(message.command, status)
        pdv = (
            struct.pack(">IBB", len(command) + 2, message.context_id, _PDV_COMMAND | _PDV_LAST)
            + command
        )
        assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv)
        self.served += 1
