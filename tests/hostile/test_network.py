"""Hostile peers over the network (issue 15), against one ``dicomai serve`` (conftest.py):
a stall inside a PDU, connections stalled before their association, a flood of them, an
association aborted mid-store, and C-STORE conformance. Every attack runs inside
:meth:`Target.attack`, which checks C-ECHO during and after, memory and threads."""

from __future__ import annotations

import struct
import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomai_tools import synthetic
from dicomai.ops.scu import echo, send_files
from tests.hostile.conftest import (
    ACSE_TIMEOUT,
    MARGIN,
    MAX_ASSOCIATIONS,
    MAX_PENDING_PER_ADDRESS,
    NETWORK_TIMEOUT,
    RELEASE_GRACE,
    THREAD_TOLERANCE,
    Target,
    storescu,
)
from tests.hostile.peers import (
    COMMAND_LAST,
    COMMAND_MORE,
    DATASET_MORE,
    EXPLICIT_VR_LE,
    VERIFICATION,
    Context,
    RawPeer,
    Siege,
    c_store_rq,
    p_data_tf,
    pdv,
)
from tests.integration.test_conformance import CT, MR, Peer, encode
from tests.waiting import sample_until

pytestmark = pytest.mark.slow

#: Threads the daemon may run while flooded: its idle ones, one per pending connection it
#: admits from one address, pynetdicom's three per association, and the tolerance.
THREAD_BOUND_EXTRA = MAX_PENDING_PER_ADDRESS + 3 * MAX_ASSOCIATIONS + THREAD_TOLERANCE
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def _dx(seed: int, **kwargs: str) -> Dataset:
    return synthetic.make_xray("chest", modality="DX", view_position="PA", rows=64, cols=64,
                               seed=seed, **kwargs)


def _modality_gets_in(target: Target, seed: int) -> None:
    """A C-ECHO (pynetdicom) and a storescu of a two-image study both succeed, each within
    10 s."""
    study = generate_uid()
    files = target.files(f"modality-{seed}", [_dx(seed, study_uid=study),
                                              _dx(seed + 1, study_uid=study)])
    started = time.monotonic()
    status = echo("127.0.0.1", target.port, called_ae="DICOMAI", calling_ae="MODALITY",
                  timeout=10.0)
    seconds = time.monotonic() - started
    assert status == 0x0000, f"C-ECHO answered {status!r} after {seconds:.1f} s"
    assert seconds < 10.0
    storescu(target.port, files, within=10.0)


@pytest.mark.parametrize("announced", ["0xFFFFFFF0", "max_pdu_length"])
def test_stall_inside_a_pdu_is_dropped(target: Target, announced: str) -> None:
    """A P-DATA-TF announcing 0xFFFFFFF0 bytes (or as many as the daemon allows), 22 sent,
    then silence: closed by the daemon within the network timeout."""
    with target.attack(), RawPeer(target.port) as peer:
        ac = peer.associate([Context(1, VERIFICATION), Context(3, CT, (EXPLICIT_VR_LE,))])
        assert set(ac.accepted) == {1, 3}
        assert peer.echo(1) == 0x0000  # the association is in full use (the fast path on)
        length = 0xFFFFFFF0 if announced == "0xFFFFFFF0" else peer.max_pdu_length
        # One PDV filling the PDU: the first 16 bytes of a C-STORE-RQ command, never the rest.
        start = c_store_rq(2, CT, generate_uid())[:16]
        body = struct.pack(">IBB", length - 4, 3, COMMAND_MORE) + start
        assert len(body) == 22
        peer.send(struct.pack(">BBI", 0x04, 0, length) + body)
        seconds = peer.wait_closed(NETWORK_TIMEOUT + MARGIN)
        assert seconds is not None, (
            f"still open {NETWORK_TIMEOUT + MARGIN:.0f} s after the stall (network timeout "
            f"{NETWORK_TIMEOUT:.0f} s)")


@pytest.mark.dcmtk
def test_16_half_open_connections_lock_nobody_out(target: Target) -> None:
    """16 connections stalled in half an A-ASSOCIATE-RQ, each replaced when dropped: C-ECHO
    and storescu get in within 10 s while 16 are held; each is dropped within the ACSE
    timeout."""
    with target.attack() as watch, Siege(target.port, 16, half_rq_every=1,
                                         replace=True) as siege:
        assert siege.held_now() == 16
        _modality_gets_in(target, seed=1101)
        assert siege.held_now() > 0, "the siege was over before the modality was done"
        siege.wait_all_closed(ACSE_TIMEOUT + MARGIN)
        assert not (late := siege.late(ACSE_TIMEOUT + MARGIN)), late
        peak = watch.sampler.peak_threads
    bound = target.baseline.threads + THREAD_BOUND_EXTRA
    assert peak <= bound, f"{peak} threads while besieged (bound {bound})"


@pytest.mark.dcmtk
def test_300_held_connections_lock_nobody_out(target: Target) -> None:
    """300 connections opened at once (half send nothing, half half an A-ASSOCIATE-RQ):
    C-ECHO and storescu get in within 10 s while they are held, threads stay bounded by the
    configuration, and every one is dropped within the ACSE timeout."""
    with target.attack() as watch, Siege(target.port, 300, half_rq_every=2) as siege:
        assert siege.held_now() > 0, "the flood was dropped before the modality came"
        _modality_gets_in(target, seed=1201)
        siege.wait_all_closed(ACSE_TIMEOUT + MARGIN)
        late = siege.late(ACSE_TIMEOUT + MARGIN)
        assert not late, (f"{len(late)} of 300 not dropped within "
                          f"{ACSE_TIMEOUT + MARGIN:.0f} s: {late[:5]}")
        peak = watch.sampler.peak_threads
    bound = target.baseline.threads + THREAD_BOUND_EXTRA
    assert peak <= bound, f"{peak} threads while flooded (bound {bound})"


def test_abort_on_a_protocol_error_leaves_no_bookkeeping(target: Target) -> None:
    """An association that stored one image of a study, then sent a command where a data set
    fragment belonged, is aborted; the study's next sender releases and the study closes
    after the release grace, not after its quiet period."""
    study, series = generate_uid(), generate_uid()
    images = [_dx(1301 + i, study_uid=study, series_uid=series) for i in range(3)]
    assert not any("ImagesInAcquisition" in ds for ds in images)  # only a release closes early
    with target.attack():
        with RawPeer(target.port) as peer:
            ac = peer.associate([Context(1, VERIFICATION), Context(3, DX, (EXPLICIT_VR_LE,))])
            assert set(ac.accepted) == {1, 3}
            assert peer.echo(1) == 0x0000
            first = images[0]
            assert peer.store(3, DX, first.SOPInstanceUID, encode(first), 2) == 0
            peer.send(p_data_tf(
                pdv(3, COMMAND_LAST, c_store_rq(3, DX, images[1].SOPInstanceUID)),
                pdv(3, DATASET_MORE, encode(images[1])[:64])))
            peer.send(p_data_tf(pdv(3, COMMAND_LAST,
                                    c_store_rq(4, DX, images[2].SOPInstanceUID))))
            assert peer.wait_closed(NETWORK_TIMEOUT + MARGIN) is not None, "not aborted"
        assert target.state(study) == "receiving"
        assert not target.stored(images[1].SOPInstanceUID)
        rest = target.files("after-abort", images[1:])
        assert send_files(rest, "127.0.0.1", target.port, called_ae="DICOMAI",
                          calling_ae="MODALITY", timeout=10).ok
        limit = RELEASE_GRACE + 2 * MARGIN
        state = sample_until(lambda: target.state(study), lambda s: s != "receiving",
                             timeout=limit, interval=0.2)
        assert state not in (None, "receiving"), (
            f"study still {state!r} {limit:.0f} s after its sender released (release grace "
            f"{RELEASE_GRACE:.0f} s): the aborted association still counts as delivering it")


def test_conformance_refusals_and_max_pdu(target: Target) -> None:
    """C-STORE conformance against the daemon: command SOP class not the context's (0x0122),
    data set SOP class not the command's (0xA900), empty Affected SOP Instance UID (answered
    0xA900), and a real maximum PDU length in the A-ASSOCIATE-AC."""
    with target.attack():
        with RawPeer(target.port) as raw:
            ac = raw.associate([Context(1, VERIFICATION)])
            assert ac.max_pdu_length not in (None, 0), "unlimited maximum PDU length announced"
            raw.release()
        ae = AE("CONFORM")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        for sop_class in (Verification, CT, MR, DX):
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", target.port, ae_title="DICOMAI")
        try:
            assert assoc.is_established
            assert assoc.acceptor.maximum_length == ac.max_pdu_length
            assert int(assoc.send_c_echo().Status) == 0x0000
            peer = Peer(ae, assoc)
            before = len(target.quarantine())
            dx = _dx(1401)
            data = encode(dx)
            statuses = [
                peer.raw(CT, DX, dx.SOPInstanceUID, data).Status,  # DX command on CT context
                peer.raw(MR, MR, dx.SOPInstanceUID, data).Status,  # DX data set, MR command
                peer.raw(DX, DX, "", data).Status,  # empty Affected SOP Instance UID
            ]
            assert statuses == [0x0122, 0xA900, 0xA900]
            assert not target.stored(dx.SOPInstanceUID)
            peer.store_ok(1402)  # the association is still usable
            assoc.release()
        finally:
            ae.shutdown()
        assert [s for _, s in target.quarantine()[before:]] == [0x0122, 0xA900, 0xA900]


def test_a_study_is_analysed_after_the_attacks(target: Target) -> None:
    """After every network attack: C-ECHO within 5 s and a legitimate study stored and
    analysed (job done, SR and SC at the PACS)."""
    target.echo_seconds()
    target.analyses_a_study(seed=1901)
