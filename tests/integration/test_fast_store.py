"""The receiver's C-STORE fast path over real associations: DCMTK storescu with small PDUs,
pynetdicom mixing C-ECHO and C-STORE on one association, the switch back to pynetdicom's path,
and a peer that breaks a message mid-dataset."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicomai_tools import synthetic
from dicomai.config import Settings
from dicomai.runtime.daemon import Daemon
from dicomai.db import Instance
from tests.conftest import running_daemon
from tests.unit.test_fast_store import store_rq_command
from tests.waiting import wait_until


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its file meta information."""
    raw = path.read_bytes()
    (meta_length,) = struct.unpack_from("<I", raw, 140)
    return raw[144 + meta_length:]


def stored_path(daemon: Daemon, sent: Path) -> Path:
    """Where the daemon stored ``sent`` (its row's path)."""
    ds = dcmread(sent, stop_before_pixels=True)
    with daemon.queue.session() as s:
        return Path(s.scalars(select(Instance.path).where(
            Instance.sop_instance_uid == ds.SOPInstanceUID)).one())


def quiet(make_settings, **receiver: object) -> Settings:
    return make_settings(None, scheduler={"study_quiet_seconds": 3600},
                         receiver={"port": 0, "min_free_disk_mb": 0, **receiver})


def store_mixed(port: int, path: Path) -> list[int]:
    """C-ECHO, C-STORE, C-ECHO on one pynetdicom association; the three statuses."""
    ds = dcmread(path)
    ae = AE("MIXED")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_echo().Status), int(assoc.send_c_store(ds).Status),
                int(assoc.send_c_echo().Status)]
    finally:
        assoc.release()
        ae.shutdown()


@pytest.mark.dcmtk
def test_fast_path_stores_multi_pdu_and_mixed_messages_exactly(make_settings, tmp_path):
    ct = synthetic.write_study(synthetic.make_head_ct(3, rows=128, cols=128), tmp_path / "ct")
    xray = synthetic.write_study([synthetic.make_xray("chest", rows=64, cols=64, seed=5)],
                                 tmp_path / "xr")
    with running_daemon(quiet(make_settings), roles=["receiver"]) as daemon:
        port = daemon.receiver.port
        # 4 KiB PDUs: each 32 KiB slice arrives as a command PDU and about 9 dataset PDUs.
        run = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "DICOMAI",
                              "--max-send-pdu", "4096", "127.0.0.1", str(port), *map(str, ct)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert store_mixed(port, xray[0]) == [0x0000, 0x0000, 0x0000]
        # The first C-STORE of an association can arrive before pynetdicom's association
        # thread has marked it established; it then takes pynetdicom's path (as pynetdicom
        # would serve it: after establishment). storescu's next ones, and the C-STORE that
        # follows a C-ECHO, are served by the fast path.
        assert daemon.receiver.fast_store_requests >= 3
        for sent in [*ct, *xray]:
            assert dataset_bytes(stored_path(daemon, sent)) == dataset_bytes(sent)
        assert daemon.index.known_instance(dcmread(xray[0]).SOPInstanceUID) is not None


def test_fast_store_off_keeps_pynetdicoms_path(make_settings, tmp_path):
    xray = synthetic.write_study([synthetic.make_xray("chest", rows=64, cols=64, seed=6)],
                                 tmp_path / "xr")
    with running_daemon(quiet(make_settings, fast_store=False), roles=["receiver"]) as daemon:
        assert store_mixed(daemon.receiver.port, xray[0]) == [0x0000, 0x0000, 0x0000]
        assert daemon.receiver.fast_store_requests == 0
        assert dataset_bytes(stored_path(daemon, xray[0])) == dataset_bytes(xray[0])


def p_data(context_id: int, *pdvs: tuple[int, bytes]) -> bytes:
    items = b"".join(struct.pack(">IBB", len(data) + 2, context_id, control) + data
                     for control, data in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


def test_a_message_broken_mid_dataset_aborts_and_stores_nothing(make_settings, tmp_path):
    ct = "1.2.840.10008.5.1.4.1.1.2"
    with running_daemon(quiet(make_settings), roles=["receiver"]) as daemon:
        port = daemon.receiver.port
        ae = AE("BREAKER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(ct, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
        assert assoc.is_established
        cid = assoc.accepted_contexts[0].context_id
        uid = generate_uid()
        # A complete C-STORE-RQ command and a first dataset fragment, then a second command
        # where the rest of the dataset belongs.
        assoc.dul.socket.send(p_data(cid, (0x03, store_rq_command(uid)),
                                     (0x00, b"\x08\x00\x18\x00")))
        assoc.dul.socket.send(p_data(cid, (0x03, store_rq_command(generate_uid()))))
        wait_until(lambda: not assoc.is_established, timeout=10, interval=0.02,
                   what="the association to end")
        assert assoc.is_aborted
        ae.shutdown()
        assert daemon.index.known_instance(uid) is None
        # nothing written (pre-created spool files stay empty)
        assert not [f for f in (daemon.spool.root / "incoming").rglob("*.dcm") if f.stat().st_size]
        # Still serving.
        xray = synthetic.write_study([synthetic.make_xray("chest", rows=64, cols=64, seed=7)],
                                     tmp_path / "xr")
        assert store_mixed(port, xray[0]) == [0x0000, 0x0000, 0x0000]


def test_a_command_split_over_pdus_goes_to_pynetdicom_then_the_fast_path_resumes(
        make_settings, tmp_path):
    ds = synthetic.make_xray("chest", rows=32, cols=32, seed=8)
    (path,) = synthetic.write_study([ds], tmp_path / "xr")
    with running_daemon(quiet(make_settings), roles=["receiver"]) as daemon:
        ae = AE("SPLITTER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", daemon.receiver.port, ae_title="DICOMAI")
        assert assoc.is_established
        cid = assoc.accepted_contexts[0].context_id
        command = store_rq_command(ds.SOPInstanceUID, sop_class=str(ds.SOPClassUID))
        data = dataset_bytes(path)
        # Pause our association's reactor (as pynetdicom's send_*() do) so that it does not
        # take the response off the DIMSE queue before we do.
        assoc._reactor_checkpoint.clear()
        wait_until(lambda: assoc._is_paused, timeout=30, interval=0.001,
                   what="our association's reactor paused")
        try:
            # The command in two fragments over two PDUs, then the dataset in two fragments.
            assoc.dul.socket.send(p_data(cid, (0x01, command[:20])))
            assoc.dul.socket.send(p_data(cid, (0x03, command[20:]), (0x00, data[:100])))
            assoc.dul.socket.send(p_data(cid, (0x02, data[100:])))
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None and rsp.Status == 0x0000
        assert daemon.receiver.fast_store_requests == 0  # pynetdicom answered it
        assert dataset_bytes(stored_path(daemon, path)) == data
        # The next message starts on the fast path again.
        other = synthetic.make_xray("chest", rows=32, cols=32, seed=9)
        assert assoc.send_c_store(other).Status == 0x0000
        assert daemon.receiver.fast_store_requests == 1
        assoc.release()
        ae.shutdown()



def test_a_pdu_announcing_gigabytes_costs_only_what_arrives(make_settings, tmp_path):
    import resource
    import socket

    with running_daemon(quiet(make_settings), roles=["receiver"]) as daemon:
        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(3):  # an A-ASSOCIATE-RQ header claiming 2 GiB, 1000 bytes, then EOF
            with socket.create_connection(("127.0.0.1", daemon.receiver.port)) as peer:
                peer.sendall(struct.pack(">BBL", 0x01, 0, 2**31) + b"\x00" * 1000)
                peer.shutdown(socket.SHUT_WR)
                peer.settimeout(10)
                try:
                    while peer.recv(4096):
                        pass
                except OSError:
                    pass
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib
        assert grown_kib < 200 * 1024, f"peak RSS grew by {grown_kib} KiB"
        xray = synthetic.write_study([synthetic.make_xray("chest", rows=32, cols=32, seed=11)],
                                     tmp_path / "xr")
        assert store_mixed(daemon.receiver.port, xray[0]) == [0x0000, 0x0000, 0x0000]


@pytest.mark.dcmtk
def test_small_instances_flushed_after_success_and_restored_at_start(make_settings, tmp_path):
    """Small images: committed with their bytes, then their files fsynced and the copies
    dropped; a copy left by a crash is written back to its file when the daemon starts."""
    from dicomai.db import InstanceCopy

    xrays = synthetic.write_study(
        [synthetic.make_xray("hand", rows=64, cols=64, seed=s) for s in range(20, 26)],
        tmp_path / "xr")
    settings = quiet(make_settings)

    def copies(daemon: Daemon) -> list[tuple[str, bytes]]:
        with daemon.queue.session() as s:
            return [(p, bytes(d)) for p, d in s.execute(select(InstanceCopy.path,
                                                               InstanceCopy.data))]

    with running_daemon(settings, roles=["receiver"]) as daemon:
        run = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "DICOMAI", "127.0.0.1",
                              str(daemon.receiver.port), *map(str, xrays)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        wait_until(lambda: not copies(daemon)
                   and daemon.receiver.copies.flushed >= len(xrays),
                   timeout=10, interval=0.05, what="the copies flushed and dropped")
        assert copies(daemon) == []
        assert daemon.receiver.copies.flushed == len(xrays)
        first = stored_path(daemon, xrays[0])
        data = first.read_bytes()
        with daemon.queue.session() as s, s.begin():  # as a machine crash would leave it
            instance_id = s.scalar(select(Instance.id).where(Instance.path == str(first)))
            s.add(InstanceCopy(instance_id=instance_id, path=str(first), data=data))
    first.write_bytes(b"")
    with running_daemon(settings, roles=["receiver"]) as daemon:
        assert copies(daemon) == []
        assert first.read_bytes() == data
        assert dataset_bytes(first) == dataset_bytes(xrays[0])
