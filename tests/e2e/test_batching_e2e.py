"""The daemon with two worker threads, cross-study batching and decode processes: two studies
analysed end to end, with the scores the plain in-thread, unbatched path gives."""

from __future__ import annotations

from datetime import UTC, datetime

import pydicom
import pytest

from dicomai_tools import synthetic
from dicomai.inference.findings import Task
from dicomai.inference.processing import analyse
from dicomai.models.backend import TorchScriptBackend
from dicomai.ops.scu import send_files
from dicomai.ops.status import collect
from tests.conftest import running_daemon
from tests.waiting import wait_until


def _done(daemon, study_uids):
    def check():
        states = {s["study_instance_uid"]: s
                  for s in collect(daemon.settings, limit=50, engine=daemon.engine)["studies"]}
        for uid in study_uids:
            s = states.get(uid)
            if s and s["state"] in ("failed", "cancelled"):
                raise AssertionError(f"study ended {s['state']}: {s['last_error']}")
        if all(uid in states and states[uid]["state"] == "done" for uid in study_uids):
            return states
        return None

    return wait_until(check, timeout=90, what="both studies done")


def test_two_studies_with_threads_batching_and_decode_processes(make_settings, local_pacs,
                                                                 tmp_path):
    settings = make_settings(local_pacs.port, worker={
        "threads": 2, "max_batch": 16, "batch_wait_ms": 50, "decode_processes": 1})
    studies = [synthetic.make_xray("chest", modality="DX", view_position="PA", rows=320,
                                   cols=280, seed=seed) for seed in (11, 12)]
    study_paths = [synthetic.write_study([ds], tmp_path / f"in{i}")
                   for i, ds in enumerate(studies)]
    paths = [p for group in study_paths for p in group]
    with running_daemon(settings) as daemon:
        assert daemon.worker is not None and daemon.worker.decode_pool is not None
        assert send_files(paths, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok
        states = _done(daemon, [ds.StudyInstanceUID for ds in studies])
        batcher = daemon.worker._batchers["chest-xray"]
        assert batcher.images == 2 and 1 <= batcher.calls <= 2
    assert daemon.worker.decode_pool is None  # shut down with the worker
    assert batcher.closed

    # The same scores as the in-thread, unbatched path (status keeps 4 decimals).
    spec = settings.model_settings("chest-xray")
    backend = TorchScriptBackend.load(settings.model_path("chest-xray"), name="chest-xray",
                                      device="cpu", warmup_size=spec.preprocessing.input_size)
    for ds, (path,) in zip(studies, study_paths, strict=True):
        source = pydicom.dcmread(path)
        findings = analyse(Task.CHEST_XRAY, [source], backend, spec, datetime.now(UTC))
        got = states[ds.StudyInstanceUID]["scores"]
        for label, score in findings.study_scores.items():
            assert got[label] == pytest.approx(score, abs=1e-4)
        assert len(local_pacs.objects(ds.StudyInstanceUID)) == 2  # SR + SC
