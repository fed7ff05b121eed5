"""Decoding out of the daemon's way: a radiograph whose decoding needs more than
``[worker] decode_memory_mb`` fails its job (a clear reason, no retry), while the daemon and
its decode process go on: the next study is analysed and its results delivered."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicomai_tools import synthetic
from dicomai.ops.scu import send_files
from dicomai.ops.status import collect
from tests.conftest import running_daemon
from tests.waiting import wait_until

MIB = 1 << 20


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("VmHWM")


def _state(daemon, study_uid: str) -> dict | None:  # type: ignore[no-untyped-def,type-arg]
    studies = collect(daemon.settings, limit=50, engine=daemon.engine)["studies"]
    return next((s for s in studies if s["study_instance_uid"] == study_uid), None)


def test_decode_over_its_memory_budget_fails_that_job_only(make_settings, local_pacs,
                                                           tmp_path):
    # Studies close 3 s after their last instance: the job starts after the sending is done.
    settings = make_settings(local_pacs.port, worker={"decode_memory_mb": 64},
                             scheduler={"study_quiet_seconds": 3.0, "early_close": False})
    assert settings.worker.decode_processes == 1  # the default
    # 6000 x 6000 x 16 bits: 72 MB of pixels, within every receiver limit, but decoding and
    # preprocessing it takes several times that.
    large = synthetic.make_xray("chest", modality="DX", view_position="PA", rows=64, cols=64,
                                seed=31)
    large.Rows = large.Columns = 6000
    large.PixelData = np.full((6000, 6000), 900, dtype=np.uint16).tobytes()
    normal = synthetic.make_xray("chest", modality="DX", view_position="PA", rows=320,
                                 cols=280, seed=32)
    with running_daemon(settings) as daemon:
        worker = daemon.worker
        assert worker is not None and worker.decode_pool is not None
        wait_until(lambda: worker.decode_pool.pids(), timeout=120, what="decode process started")
        (pid,) = worker.decode_pool.pids()
        assert send_files(synthetic.write_study([large], tmp_path / "large"), "127.0.0.1",
                          daemon.receiver.port, called_ae="DICOMAI").ok
        assert _state(daemon, large.StudyInstanceUID)["state"] == "receiving"
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS of the job's handling
        before = _rss()

        def failed() -> dict | None:  # type: ignore[type-arg]
            s = _state(daemon, large.StudyInstanceUID)
            return s if s and s["state"] == "failed" else None

        study = wait_until(failed, timeout=120, what="the large study failed")
        assert "decode_memory_mb" in study["last_error"]
        # The daemon (this process) read the file's headers only: decoding it here would take
        # several times its 72 MB of pixels.
        growth = _rss() - before
        assert growth < 100 * MIB, f"peak RSS grew by {growth / MIB:.0f} MiB"

        # The same decode process serves the next study, analysed and delivered as usual.
        assert send_files(synthetic.write_study([normal], tmp_path / "normal"), "127.0.0.1",
                          daemon.receiver.port, called_ae="DICOMAI").ok

        def done() -> dict | None:  # type: ignore[type-arg]
            s = _state(daemon, normal.StudyInstanceUID)
            if s and s["state"] == "failed":
                raise AssertionError(f"normal study failed: {s['last_error']}")
            return s if s and s["state"] == "done" else None

        wait_until(done, timeout=120, what="the normal study done")
        assert worker.decode_pool.pids() == [pid] and worker.decode_pool.restarts == 0
    assert len(local_pacs.objects(normal.StudyInstanceUID)) == 2  # SR + SC
    assert local_pacs.objects(large.StudyInstanceUID) == []
