"""C-STORE conformance of the receiver over real loopback associations, on both C-STORE paths
(``[receiver] fast_store`` true and false), which must answer alike:

- a command whose Affected SOP Class UID is not the abstract syntax of its presentation
  context is refused with 0x0122 (Refused: SOP Class not supported);
- a data set whose SOP Class or SOP Instance UID differs from the command's is refused with
  0xA900 (Error: Data Set does not match SOP Class);
- a command with an empty or absent Affected SOP Instance UID is answered (0xA900);
- the A-ASSOCIATE-AC announces ``[receiver] max_pdu_length``, never 0 (unlimited).

Each refusal is checked for its status, for nothing stored (no instance file in the spool,
no instance row; the refused bytes go to quarantine with a reason code) and for the
association staying usable: a normal C-STORE on it afterwards succeeds.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from dicomai_tools import synthetic
from dicomai.config import ReceiverSettings
from dicomai.runtime.daemon import Daemon
from dicomai.db import Instance, QuarantineEntry
from tests.conftest import running_daemon
from tests.integration.test_fast_store import p_data, quiet
from tests.waiting import wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
#: A well-formed UID that names no SOP class pynetdicom (or anyone) knows.
UNKNOWN_CLASS = "1.2.826.0.1.3680043.8.498.424242"

def store_command(sop_class: str | None, sop_uid: str | None, message_id: int) -> bytes:
    """A C-STORE-RQ command set with a data set, Implicit VR Little Endian, written by hand
    (pynetdicom's primitives refuse to build a broken one): a UID of ``None`` leaves its
    element out, ``""`` sends it empty."""

    def element(number: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0x0000, number, len(value)) + value

    def uid(value: str) -> bytes:
        raw = value.encode("ascii")
        return raw + b"\x00" if len(raw) % 2 else raw

    body = b"".join((
        element(0x0002, uid(sop_class)) if sop_class is not None else b"",
        element(0x0100, struct.pack("<H", 0x0001)),  # C-STORE-RQ
        element(0x0110, struct.pack("<H", message_id)),
        element(0x0700, struct.pack("<H", 0x0002)),  # priority LOW
        element(0x0800, struct.pack("<H", 0x0000)),  # a data set follows
        element(0x1000, uid(sop_uid)) if sop_uid is not None else b"",
    ))
    return element(0x0000, struct.pack("<I", len(body))) + body


def encode(ds: Dataset) -> bytes:
    """``ds`` as Explicit VR Little Endian data set bytes (no file meta)."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def xray(seed: int) -> Dataset:
    return synthetic.make_xray("chest", rows=32, cols=32, seed=seed)


@dataclass
class Peer:
    """A storage SCU's association with the receiver (CT, MR, the X-ray's class, C-ECHO)."""

    ae: AE
    assoc: Association
    next_id: int = 100

    def context_id(self, abstract_syntax: str) -> int:
        return next(cx.context_id for cx in self.assoc.accepted_contexts
                    if cx.abstract_syntax == abstract_syntax)

    def raw_store(self, abstract_syntax: str, command: bytes, data: bytes) -> C_STORE | None:
        """Send a C-STORE-RQ as hand-made PDVs on the context of ``abstract_syntax``; the
        C-STORE-RSP primitive, or ``None`` if none came within the DIMSE timeout."""
        cid = self.context_id(abstract_syntax)
        # Pause our association's reactor (as pynetdicom's send_*() do) so that it does not
        # take the response off the DIMSE queue before we do.
        self.assoc._reactor_checkpoint.clear()
        wait_until(lambda: self.assoc._is_paused, timeout=30, interval=0.001,
                   what="our association's reactor paused")
        try:
            self.assoc.dul.socket.send(p_data(cid, (0x03, command), (0x02, data)))
            _, rsp = self.assoc.dimse.get_msg(block=True)
        finally:
            self.assoc._reactor_checkpoint.set()
        assert rsp is None or isinstance(rsp, C_STORE)
        return rsp

    def raw(self, abstract_syntax: str, sop_class: str | None, sop_uid: str | None,
            data: bytes) -> C_STORE:
        self.next_id += 1
        rsp = self.raw_store(abstract_syntax, store_command(sop_class, sop_uid, self.next_id),
                             data)
        assert rsp is not None, "no C-STORE-RSP"
        assert rsp.MessageIDBeingRespondedTo == self.next_id
        return rsp

    def send_file_as_is(self, path: Path) -> int:
        """pynetdicom's ``send_c_store`` of a Part 10 file without decoding it: the command
        carries the file meta's SOP Class/Instance UIDs, the data set goes as it is."""
        chunked = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            return int(self.assoc.send_c_store(path).Status)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = chunked

    def store_ok(self, seed: int) -> Dataset:
        """A normal C-STORE (pynetdicom's public API) on the same association: Success."""
        ds = xray(seed)
        assert self.assoc.is_established
        assert int(self.assoc.send_c_store(ds).Status) == 0x0000
        return ds


@pytest.fixture
def receiver(request: pytest.FixtureRequest, make_settings: Any) -> Iterator[Daemon]:
    """A daemon running only its receiver, ``fast_store`` as parametrized."""
    settings = quiet(make_settings, fast_store=request.param)
    with running_daemon(settings, roles=["receiver"]) as daemon:
        yield daemon


def associate(daemon: Daemon) -> Peer:
    ae = AE("CONFORM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class in (Verification, CT, MR, xray(0).SOPClassUID):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", daemon.receiver.port, ae_title="DICOMAI")
    assert assoc.is_established
    # Answered only once the receiver has marked the association established: the C-STOREs
    # after it are served by the fast path where it is on.
    assert int(assoc.send_c_echo().Status) == 0x0000
    return Peer(ae, assoc)


@pytest.fixture
def peer(receiver: Daemon) -> Iterator[Peer]:
    p = associate(receiver)
    try:
        yield p
    finally:
        if p.assoc.is_established:
            p.assoc.release()
        p.ae.shutdown()


def instance_files(daemon: Daemon) -> list[Path]:
    """Instance files in the spool (pre-created empty ones do not count)."""
    return [f for f in (daemon.spool.root / "incoming").rglob("*.dcm") if f.stat().st_size]


def instance_rows(daemon: Daemon) -> int:
    with daemon.queue.session() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def quarantined(daemon: Daemon) -> list[tuple[str, int]]:
    """(reason, status) of every quarantine record, oldest first."""
    with daemon.queue.session() as s:
        return [(r, int(c)) for r, c in s.execute(
            select(QuarantineEntry.reason, QuarantineEntry.status_code)
            .order_by(QuarantineEntry.id))]


def assert_only_stored(daemon: Daemon, stored: list[Dataset]) -> None:
    """Exactly ``stored`` are instances: files in the spool and rows alike."""
    assert instance_rows(daemon) == len(stored)
    assert len(instance_files(daemon)) == len(stored)
    for ds in stored:
        assert daemon.index.known_instance(ds.SOPInstanceUID) == "stored"


def expect_path(daemon: Daemon, fast_store: bool, requests: int) -> None:
    """The requests were served by the path under test."""
    assert daemon.receiver.fast_store_requests == (requests if fast_store else 0)


@pytest.mark.parametrize("receiver", [True, False], ids=["fast", "pynetdicom"],
                         indirect=True)
def test_command_sop_class_not_the_contexts_is_refused_0x0122(receiver, peer):
    fast_store = receiver.settings.receiver.fast_store
    dx = xray(1)
    data = encode(dx)
    stored = []
    # A DX command and DX data set on the CT context; a CT command would have matched it.
    rsp = peer.raw(CT, str(dx.SOPClassUID), dx.SOPInstanceUID, data)
    assert (rsp.Status, rsp.AffectedSOPInstanceUID) == (0x0122, dx.SOPInstanceUID)
    assert receiver.index.known_instance(dx.SOPInstanceUID) is None
    stored.append(peer.store_ok(2))
    # A SOP class nobody knows (pynetdicom alone used to abort the association for it).
    rsp = peer.raw(CT, UNKNOWN_CLASS, dx.SOPInstanceUID, data)
    assert rsp.Status == 0x0122
    stored.append(peer.store_ok(3))
    # No SOP class at all, empty or absent.
    assert peer.raw(CT, "", dx.SOPInstanceUID, data).Status == 0x0122
    assert peer.raw(CT, None, dx.SOPInstanceUID, data).Status == 0x0122
    stored.append(peer.store_ok(4))
    assert peer.assoc.is_established
    assert_only_stored(receiver, stored)
    assert quarantined(receiver) == [("context_mismatch", 0x0122)] * 4
    assert len(list((receiver.spool.root / "quarantine" / "context_mismatch").glob("*"))) == 4
    expect_path(receiver, fast_store, 7)


@pytest.mark.parametrize("receiver", [True, False], ids=["fast", "pynetdicom"],
                         indirect=True)
def test_data_set_not_matching_its_command_is_refused_0xA900(receiver, peer, tmp_path):
    fast_store = receiver.settings.receiver.fast_store
    stored = []
    # The data set says MR, the command and the context say CT (sent with pynetdicom's
    # send_c_store of a file whose file meta says CT).
    mr = xray(11)
    mr.SOPClassUID = MR
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = mr.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path = tmp_path / "mr-as-ct.dcm"
    path.write_bytes(buf.getvalue() + encode(mr))
    assert peer.send_file_as_is(path) == 0xA900
    assert receiver.index.known_instance(mr.SOPInstanceUID) is None
    stored.append(peer.store_ok(12))
    # A DX data set under an MR command on the MR context (hand-made PDVs), and a data set
    # without any SOP Class UID.
    dx = xray(13)
    assert peer.raw(MR, MR, dx.SOPInstanceUID, encode(dx)).Status == 0xA900
    del dx.SOPClassUID
    assert peer.raw(str(xray(0).SOPClassUID), str(xray(0).SOPClassUID), dx.SOPInstanceUID,
                    encode(dx)).Status == 0xA900
    stored.append(peer.store_ok(14))
    # The data set's SOP Instance UID is not the command's.
    other = xray(15)
    rsp = peer.raw(str(other.SOPClassUID), str(other.SOPClassUID), generate_uid(),
                   encode(other))
    assert rsp.Status == 0xA900
    assert receiver.index.known_instance(other.SOPInstanceUID) is None
    stored.append(peer.store_ok(16))
    assert_only_stored(receiver, stored)
    assert quarantined(receiver) == [("sop_class_mismatch", 0xA900)] * 3 + [
        ("uid_mismatch", 0xA900)]
    expect_path(receiver, fast_store, 7)


@pytest.mark.parametrize("receiver", [True, False], ids=["fast", "pynetdicom"],
                         indirect=True)
def test_command_without_affected_sop_instance_uid_is_answered(receiver, peer):
    fast_store = receiver.settings.receiver.fast_store
    dx = xray(21)
    dx_class = str(dx.SOPClassUID)
    stored = []
    for uid in ("", None):  # empty, then absent
        rsp = peer.raw(dx_class, dx_class, uid, encode(dx))
        assert rsp.Status == 0xA900
        assert rsp.AffectedSOPInstanceUID is None  # nothing to echo back
        assert rsp.AffectedSOPClassUID == dx_class
        assert receiver.index.known_instance(dx.SOPInstanceUID) is None
        stored.append(peer.store_ok(22 if uid == "" else 23))
    assert_only_stored(receiver, stored)
    assert quarantined(receiver) == [("missing_affected_uid", 0xA900)] * 2
    expect_path(receiver, fast_store, 4)


def test_the_first_c_store_of_an_association_is_refused_alike(make_settings):
    """The first C-STORE may reach pynetdicom even with the fast path on (it can arrive
    before the receiver marks the association established): refused the same way."""
    dx = xray(31)
    with running_daemon(quiet(make_settings), roles=["receiver"]) as daemon:
        ae = AE("CONFORM")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(CT, ExplicitVRLittleEndian)
        ae.add_requested_context(dx.SOPClassUID, ExplicitVRLittleEndian)
        for seed, (sop_class, uid, status) in enumerate(
                ((UNKNOWN_CLASS, dx.SOPInstanceUID, 0x0122), (str(dx.SOPClassUID), "", 0xA900)),
                start=32):
            assoc = ae.associate("127.0.0.1", daemon.receiver.port, ae_title="DICOMAI")
            assert assoc.is_established
            peer = Peer(ae, assoc)
            assert peer.raw(CT if sop_class == UNKNOWN_CLASS else sop_class, sop_class, uid,
                            encode(dx)).Status == status
            peer.store_ok(seed)
            assoc.release()
        ae.shutdown()
        assert daemon.index.known_instance(dx.SOPInstanceUID) is None
        assert [r for r, _ in quarantined(daemon)] == ["context_mismatch",
                                                       "missing_affected_uid"]


@pytest.mark.parametrize("fast_store", [True, False], ids=["fast", "pynetdicom"])
@pytest.mark.parametrize("max_pdu", [None, 16384])
def test_associate_ac_announces_the_configured_max_pdu_length(make_settings, fast_store,
                                                              max_pdu):
    receiver = {"fast_store": fast_store}
    if max_pdu is not None:
        receiver["max_pdu_length"] = max_pdu
    with running_daemon(quiet(make_settings, **receiver), roles=["receiver"]) as daemon:
        assert daemon.settings.receiver.max_pdu_length == (max_pdu or 262144)
        peer = associate(daemon)
        try:
            assert peer.assoc.acceptor.maximum_length == (max_pdu or 262144)
            # The sender splits to it: a 128 KiB image arrives in several PDUs, intact.
            ct = synthetic.make_head_ct(1, rows=256, cols=256)[0]
            assert int(peer.assoc.send_c_store(ct).Status) == 0x0000
            assert daemon.index.known_instance(ct.SOPInstanceUID) == "stored"
        finally:
            peer.assoc.release()
            peer.ae.shutdown()
        expect_path(daemon, fast_store, 1)


def test_max_pdu_length_is_validated():
    assert ReceiverSettings().max_pdu_length == 262144
    for good in (4096, 2**32 - 1):
        assert ReceiverSettings(max_pdu_length=good).max_pdu_length == good
    for bad in (0, -1, 4095, 2**32):
        with pytest.raises(ValidationError):
            ReceiverSettings(max_pdu_length=bad)
