"""``[receiver] processes``: receiver processes sharing the port (SO_REUSEPORT), real
associations over loopback, the shared SQLite database, early close woken from a child."""

from __future__ import annotations

import os
import time

from sqlalchemy import func, select

from dicomai import synthetic
from dicomai.db import Instance, Job
from dicomai.scu import send_files
from tests.conftest import running_daemon, wait_for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_receiver_processes_share_the_port_and_stop_with_the_daemon(make_settings, tmp_path):
    # Scheduler ticks a minute apart: only the wake-up a child sends on each release can close
    # the studies early within the time allowed here.
    settings = make_settings(
        None, receiver={"processes": 2},
        scheduler={"study_quiet_seconds": 600.0, "poll_seconds": 60.0, "early_close": True,
                   "release_grace_seconds": 0.5})
    studies = [synthetic.make_xray("chest", rows=32, cols=32, seed=700 + i) for i in range(16)]
    with running_daemon(settings, roles=["receiver", "scheduler"]) as daemon:
        assert daemon.receiver_pool is not None
        (child,) = daemon.receiver_pool.pids
        assert _alive(child)
        time.sleep(0.3)  # the scheduler's first tick has passed
        # Count the releases each side reports: the daemon's own receiver calls its
        # on_release, a child's is forwarded to the pool's.
        own: list[int] = []
        forwarded: list[int] = []
        for component, seen in ((daemon.receiver, own), (daemon.receiver_pool, forwarded)):
            wake = component.on_release
            assert wake is not None
            component.on_release = (lambda seen=seen, wake=wake: (seen.append(1), wake()))
        for i, ds in enumerate(studies):
            files = synthetic.write_study([ds], tmp_path / str(i))
            assert send_files(files, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok
        # Connections are spread by the kernel: with 16 of them, both processes served some
        # (all on one side: probability 2 / 2**16). Each association the child served
        # reported its release to the daemon.
        wait_for(lambda: len(own) + len(forwarded) == 16, 10, what="16 releases reported")
        assert own and forwarded

        def count(*where):
            with daemon.queue.session() as s:
                return s.scalar(select(func.count()).select_from(Job).where(*where))

        with daemon.queue.session() as s:
            assert s.scalar(select(func.count(Instance.id))) == 16
        wait_for(lambda: count(Job.released_at.is_not(None)) == 16, 10,
                 what="16 releases recorded")
        wait_for(lambda: count(Job.state != "receiving") == 16, 15,
                 what="16 studies closed early")
    assert not _alive(child)
