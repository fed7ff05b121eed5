"""``[receiver] processes``: the daemon hands connections to receiver child processes (the
least busy first), real associations over loopback, the shared SQLite database, early close
woken from a child, TLS through a hand-off, a child that dies."""

from __future__ import annotations

import os
import signal
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select

from dicomai import metrics, synthetic
from dicomai.db import Instance, Job
from dicomai.scu import send_files
from tests.conftest import running_daemon, wait_for
from tests.integration.test_receiver_faults import _tls_echo, certificates  # noqa: F401


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_receiver_processes_share_the_work_and_stop_with_the_daemon(make_settings, tmp_path):
    # Scheduler ticks a minute apart: only the wake-up a child sends on each release can close
    # the studies early within the time allowed here.
    settings = make_settings(
        None, receiver={"processes": 2},
        scheduler={"study_quiet_seconds": 600.0, "poll_seconds": 60.0, "early_close": True,
                   "release_grace_seconds": 0.5})
    studies = [synthetic.make_xray("chest", rows=32, cols=32, seed=700 + i) for i in range(16)]
    before = metrics.receiver_totals()
    with running_daemon(settings, roles=["receiver", "scheduler"]) as daemon:
        pool = daemon.receiver_pool
        assert pool is not None
        (child,) = pool.pids
        assert _alive(child)
        time.sleep(0.3)  # the scheduler's first tick has passed
        # Count the releases each side reports: the daemon's own receiver calls its
        # on_release, a child's is forwarded to the pool's.
        own: list[int] = []
        forwarded: list[int] = []
        for component, seen in ((daemon.receiver, own), (pool, forwarded)):
            wake = component.on_release
            assert wake is not None
            component.on_release = (lambda seen=seen, wake=wake: (seen.append(1), wake()))
        for i, ds in enumerate(studies):
            files = synthetic.write_study([ds], tmp_path / str(i))
            assert send_files(files, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok
        # One association at a time: ties go round, so both processes served some. Each
        # association the child served reported its release to the daemon.
        wait_for(lambda: len(own) + len(forwarded) == 16, 10, what="16 releases reported")
        assert own and forwarded
        assert sum(pool.handed) == 16 and (len(own), len(forwarded)) == tuple(pool.handed)
        wait_for(lambda: pool.open_connections() == [0, 0], 10, what="connections ended")

        def count(*where):
            with daemon.queue.session() as s:
                return s.scalar(select(func.count()).select_from(Job).where(*where))

        with daemon.queue.session() as s:
            assert s.scalar(select(func.count(Instance.id))) == 16
        wait_for(lambda: count(Job.released_at.is_not(None)) == 16, 10,
                 what="16 releases recorded")
        wait_for(lambda: count(Job.state != "receiving") == 16, 15,
                 what="16 studies closed early")
        # The daemon's counters (its /metrics) include what the child stored.
        wait_for(lambda: metrics.receiver_delta(metrics.receiver_totals(), before)
                 ["instances"] == 16, 10, what="the child's counts reported")
        stored = sum(p.stat().st_size for p in (daemon.settings.spool_path / "incoming")
                     .rglob("*.dcm"))
        assert metrics.receiver_delta(metrics.receiver_totals(), before)["bytes"] == stored
    assert not _alive(child)


def test_concurrent_associations_go_to_the_least_busy_process(make_settings):
    """Four associations open at once over 2 processes: two each, whatever their ports
    (the kernel's SO_REUSEPORT hash often put 3 of 4 on one process)."""
    settings = make_settings(None, receiver={"processes": 2},
                             scheduler={"study_quiet_seconds": 600.0})
    ct = synthetic.make_head_ct(4, rows=64, cols=64)
    with running_daemon(settings, roles=["receiver"]) as daemon:
        pool = daemon.receiver_pool
        assert pool is not None
        ae = AE(ae_title="PACS")
        ae.add_requested_context(ct[0].SOPClassUID, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assocs = [ae.associate("127.0.0.1", daemon.receiver.port, ae_title="DICOMAI")
                  for _ in range(4)]
        try:
            assert all(a.is_established for a in assocs)
            assert pool.open_connections() == [2, 2]
            statuses = [int(a.send_c_store(ds).Status) for a, ds in zip(assocs, ct, strict=True)]
            assert statuses == [0] * 4
        finally:
            for a in assocs:
                a.release()
            ae.shutdown()
        wait_for(lambda: pool.open_connections() == [0, 0], 10, what="connections ended")
        assert all(daemon.queue.known_instance(ds.SOPInstanceUID) == "stored" for ds in ct)
        # a fifth association when both are idle: served too
        files = synthetic.write_study([synthetic.make_xray("chest", rows=32, cols=32, seed=9)],
                                      daemon.settings.general.data_dir / "x")
        assert send_files(files, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok
        assert sum(pool.handed) == 5


def test_a_dead_receiver_process_gets_no_more_connections(make_settings, tmp_path):
    settings = make_settings(None, receiver={"processes": 2},
                             scheduler={"study_quiet_seconds": 600.0})
    with running_daemon(settings, roles=["receiver"]) as daemon:
        pool = daemon.receiver_pool
        assert pool is not None
        (child,) = pool.pids
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: not pool.pids, 10, what="the child's end noticed")
        before = list(pool.handed)
        for i in range(3):
            ds = synthetic.make_xray("chest", rows=32, cols=32, seed=800 + i)
            files = synthetic.write_study([ds], tmp_path / str(i))
            assert send_files(files, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok
            assert daemon.queue.known_instance(ds.SOPInstanceUID) == "stored"
        assert pool.handed == [before[0] + 3, before[1]]


@pytest.mark.skipif(not os.path.exists("/usr/bin/openssl"), reason="openssl not installed")
def test_tls_associations_handed_to_a_child(make_settings, certificates):  # noqa: F811
    c = certificates
    settings = make_settings(None, receiver={
        "processes": 2,
        "tls_cert_file": str(c["server.pem"]), "tls_key_file": str(c["server.key"]),
        "tls_ca_file": str(c["ca.pem"]), "tls_require_client_cert": True},
        scheduler={"study_quiet_seconds": 600.0})
    ct = synthetic.make_head_ct(2, rows=128, cols=128)
    with running_daemon(settings, roles=["receiver"]) as daemon:
        pool = daemon.receiver_pool
        assert pool is not None
        port = daemon.receiver.port
        for _ in range(2):  # one in each process (ties go round)
            assert _tls_echo(port, c["ca.pem"], c["client.pem"], c["client.key"],
                             store=ct) == 0
            wait_for(lambda: pool.open_connections() == [0, 0], 10, what="ended")
        assert pool.handed == [1, 1]
        assert _tls_echo(port, c["ca.pem"]) is None  # no client certificate: refused there too
        assert all(daemon.queue.known_instance(ds.SOPInstanceUID) == "stored" for ds in ct)
