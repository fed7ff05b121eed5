"""The C-STORE fast path's encoders and parsers, checked against pynetdicom's own encoding."""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode

from dicomai.ingest.fast_store import StoreCommand, encode_store_response, parse_command, parse_pdvs

CT = "1.2.840.10008.5.1.4.1.1.2"


def store_rq_command(sop_uid: str, message_id: int = 7, with_dataset: bool = True,
                     sop_class: str = CT) -> bytes:
    """The command set bytes pynetdicom sends for a C-STORE-RQ."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Priority = 2
    primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = BytesIO(b"\x08\x00\x18\x00" if with_dataset else b"")
    msg = C_STORE_RQ()
    msg.primitive_to_message(primitive)
    if not with_dataset:
        msg.command_set.CommandDataSetType = 0x0101
    return bytes(encode(msg.command_set, True, True))


def test_parse_command_reads_pynetdicoms_c_store_rq() -> None:
    uid = generate_uid()
    assert parse_command(store_rq_command(uid, 4242)) == StoreCommand(
        message_id=4242, sop_class_uid=CT, sop_instance_uid=uid)


def test_parse_command_leaves_everything_else_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    msg = C_ECHO_RQ()
    msg.primitive_to_message(echo)
    assert parse_command(bytes(encode(msg.command_set, True, True))) is None
    good = store_rq_command(generate_uid())
    assert parse_command(store_rq_command(generate_uid(), with_dataset=False)) is None
    assert parse_command(good[:-3]) is None  # truncated
    assert parse_command(b"") is None
    not_group_0 = struct.pack("<HHI", 0x0008, 0x0016, 2) + b"1\x00"
    assert parse_command(good + not_group_0) is None


def test_store_response_is_byte_identical_to_pynetdicoms() -> None:
    uid = generate_uid()
    for status in (0x0000, 0xA700, 0xA900, 0xC210):
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = 99
        primitive.AffectedSOPClassUID = CT
        primitive.AffectedSOPInstanceUID = uid
        primitive.Status = status
        msg = C_STORE_RSP()
        msg.primitive_to_message(primitive)
        theirs = bytes(encode(msg.command_set, True, True))
        ours = encode_store_response(StoreCommand(99, CT, uid), status)
        assert ours == theirs
        decoded = decode(BytesIO(ours), True, True)
        assert decoded.CommandField == 0x8001 and decoded.Status == status


def test_parse_pdvs_splits_items_and_refuses_malformed_ones() -> None:
    body = (struct.pack(">IBB", 2 + 3, 1, 0x03) + b"cmd"
            + struct.pack(">IBB", 2 + 4, 1, 0x00) + b"data")
    items = parse_pdvs(body)
    assert items is not None
    assert [(cid, ctl, bytes(data)) for cid, ctl, data in items] == [
        (1, 0x03, b"cmd"), (1, 0x00, b"data")]
    assert parse_pdvs(body[:-1]) is None  # the last item overruns the PDU
    assert parse_pdvs(struct.pack(">IBB", 1, 1, 0)) is None  # item length below 2
    assert parse_pdvs(b"\x00\x00") is None
    assert parse_pdvs(b"") is None


def test_parse_command_reads_empty_or_absent_uids_as_empty() -> None:
    """Such a C-STORE-RQ is still one: the store step refuses it and it gets a response."""
    uid = generate_uid()
    no_instance = store_rq_command("")  # pynetdicom leaves an empty UID out
    assert parse_command(no_instance) == StoreCommand(7, CT, "")
    empty = struct.pack("<HHI", 0x0000, 0x1000, 0)
    assert parse_command(no_instance + empty) == StoreCommand(7, CT, "")
    decoded = decode(BytesIO(store_rq_command(uid)), True, True)
    del decoded.AffectedSOPClassUID
    del decoded.CommandGroupLength
    body = bytes(encode(decoded, True, True))
    no_class = struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body
    assert parse_command(no_class) == StoreCommand(7, "", uid)


def test_store_response_leaves_out_empty_uids_as_pynetdicom_does() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 5
    primitive.AffectedSOPClassUID = CT
    primitive.Status = 0xA900
    msg = C_STORE_RSP()
    msg.primitive_to_message(primitive)
    theirs = bytes(encode(msg.command_set, True, True))
    assert encode_store_response(StoreCommand(5, CT, ""), 0xA900) == theirs
    decoded = decode(BytesIO(encode_store_response(StoreCommand(5, "", ""), 0x0122)), True, True)
    assert "AffectedSOPClassUID" not in decoded and "AffectedSOPInstanceUID" not in decoded
    assert decoded.Status == 0x0122 and decoded.MessageIDBeingRespondedTo == 5
