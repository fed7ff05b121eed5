"""Scale-out on PostgreSQL: 2 receivers, 3 workers, 1 sender, 2 schedulers as separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicomai_tools import synthetic
from dicomai.config import load_settings
from dicomai.db import Instance, Job, make_engine, make_session_factory
from dicomai.models.reference import REFERENCE_MODELS
from dicomai.ops.scu import send_files
from dicomai.ops.status import collect
from tests.conftest import DEFAULT_CONFIG, free_port, listening
from tests.waiting import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

N_STUDIES = 200


class Cluster:
    """dicomai processes sharing one PostgreSQL database and one spool directory."""

    def __init__(self, tmp: Path, pg_url: str, model_dir: Path, pacs_port: int) -> None:
        self.tmp = tmp
        self.data = tmp / "shared"
        (self.data / "models").mkdir(parents=True)
        for ref in REFERENCE_MODELS.values():
            os.symlink(model_dir / ref.filename, self.data / "models" / ref.filename)
        self.config = tmp / "dicomai.toml"
        self.config.write_text(DEFAULT_CONFIG.read_text().replace("port = 4242",
                                                                  f"port = {pacs_port}"))
        self.env = {
            "DICOMAI_GENERAL__DATA_DIR": str(self.data),
            "DICOMAI_DATABASE__URL": pg_url,
            "DICOMAI_RECEIVER__MIN_FREE_DISK_MB": "0",
            "DICOMAI_SCHEDULER__STUDY_QUIET_SECONDS": "2",
            "DICOMAI_SCHEDULER__POLL_SECONDS": "0.5",
            "DICOMAI_SCHEDULER__STALE_CLAIM_SECONDS": "6",
            "DICOMAI_WORKER__POLL_SECONDS": "0.2",
            "DICOMAI_WORKER__HEARTBEAT_SECONDS": "1",
            "DICOMAI_WORKER__TORCH_THREADS": "1",
            "DICOMAI_SENDER__POLL_SECONDS": "0.2",
            "DICOMAI_SENDER__RETRY_BASE_SECONDS": "1",
            "DICOMAI_LOGGING__LEVEL": "WARNING",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.settings = load_settings(self.config, environ=self.env)

    def start(self, name: str, roles: str, **env: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomai", "--config", str(self.config), "serve",
             "--only", roles],
            env={**os.environ, **self.env, **env}, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True)
        proc.log = log  # type: ignore[attr-defined]
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.log.close()  # type: ignore[attr-defined]

    def stop(self) -> dict[str, int | None]:
        codes = {}
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[name] = proc.wait(30)
            proc.log.close()  # type: ignore[attr-defined]
        self.procs.clear()
        return codes


def _active_scheduler_pid(settings, other_than: int | None = None) -> int | None:
    """The PID of a fresh component reporting an active scheduler (not ``other_than``: a
    killed process's last heartbeat still says active until it goes stale)."""
    data = collect(settings)
    for c in data["daemon"]["components"]:
        if (c.get("scheduler") == "active" and c.get("fresh", True)
                and int(c["pid"]) != other_than):
            return int(c["pid"])
    return None


def test_two_receivers_three_workers_one_sender(tmp_path, pg_url, model_dir, local_pacs):
    cluster = Cluster(tmp_path, pg_url, model_dir, local_pacs.port)
    ports = [free_port(), free_port()]
    studies = [synthetic.make_xray("chest", rows=96, cols=96, seed=1000 + i)
               for i in range(N_STUDIES)]
    files = synthetic.write_study(studies, tmp_path / "in")
    try:
        # The schema is created by the first process; the others find it ready.
        for i, port in enumerate(ports):
            cluster.start(f"receiver{i}", "receiver", DICOMAI_RECEIVER__PORT=str(port))
        for i in range(3):
            cluster.start(f"worker{i}", "worker")
        cluster.start("sender", "sender")
        cluster.start("scheduler-a", "scheduler")
        cluster.start("scheduler-b", "scheduler")
        for port in ports:
            wait_until(lambda p=port: listening(p), timeout=120, interval=0.5, what="receiver up")
        wait_until(lambda: len(collect(cluster.settings)["daemon"]["components"]) == 8,
                   timeout=120, interval=0.5, what="all 8 processes beating")
        active = wait_until(lambda: _active_scheduler_pid(cluster.settings), timeout=30,
                            what="an active scheduler")

        t0 = time.monotonic()
        halves = [files[0::2], files[1::2]]
        with ThreadPoolExecutor(4) as pool:  # 2 associations per receiver
            chunks = [(port, half[j::2]) for port, half in zip(ports, halves, strict=True)
                      for j in range(2)]
            results = list(pool.map(lambda c: send_files(c[1], "127.0.0.1", c[0],
                                                         called_ae="DICOMAI"), chunks))
        assert all(r.ok for r in results)
        sent_s = time.monotonic() - t0

        # Mid-run: kill -9 one worker, and the active scheduler.
        wait_until(lambda: collect(cluster.settings)["counts"]["done"] >= 20, timeout=180,
                   interval=0.5, what="20 studies done")
        cluster.kill("worker0")
        victim = next(n for n, p in cluster.procs.items() if p.pid == active)
        cluster.kill(victim)
        wait_until(lambda: _active_scheduler_pid(cluster.settings, other_than=active),
                   timeout=60, interval=0.5, what="the standby scheduler taking over")

        def all_done():
            counts = collect(cluster.settings, limit=1)["counts"]
            return counts["done"] == N_STUDIES

        wait_until(all_done, timeout=420, interval=1.0, what=f"{N_STUDIES} studies done")
        elapsed = time.monotonic() - t0
    finally:
        codes = cluster.stop()
    assert all(code == 0 for code in codes.values()), codes

    # Every instance stored once; every study processed once; every result delivered once.
    engine = make_engine(cluster.settings.database_url)
    with make_session_factory(engine)() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == N_STUDIES
        assert s.scalar(select(func.count()).select_from(Job)) == N_STUDIES
        assert s.scalar(select(func.max(Job.generation))) == 1
    engine.dispose()
    for ds in studies:
        srs = {o.sop_instance_uid for o in local_pacs.objects(ds.StudyInstanceUID)
               if o.modality == "SR"}
        assert len(srs) == 1
    distinct = {o.sop_instance_uid for o in local_pacs.objects()}
    assert len(distinct) == 2 * N_STUDIES
    figures = {"studies": N_STUDIES, "send_seconds": round(sent_s, 1),
               "total_seconds": round(elapsed, 1),
               "studies_per_minute": round(60 * N_STUDIES / elapsed, 1),
               "objects_received": len(local_pacs.objects()), "distinct_objects": len(distinct)}
    (tmp_path / "scaleout.json").write_text(json.dumps(figures))
    print("scale-out figures:", json.dumps(figures))
