"""Priority under a backlog: a brain CT's latency idle vs behind 100 queued chest X-rays.

Runs the real daemon in-process (SQLite, reference models on CPU, default routes: brain CT
priority 10, X-rays 0) with a local Storage SCP as the destination. Measures, from the last
instance acknowledged to the last result object acknowledged:

1. the brain CT alone (idle), ``--repeats`` times;
2. the same CT sent right after a backlog of ``--backlog`` chest X-ray studies was received
   and closed, with the route priorities as configured;
3. optionally (``--fifo``) the same with every route at priority 0, for comparison.

Prints each figure, the backlog still waiting when the CT's results arrived (proof that it
jumped the queue), and the ratio against idle (target: ≤ 2×). Not a test: it prints figures.

    .venv/bin/python bench/priority.py [--backlog 100] [--slices 200] [--fifo]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from dicomai_tools import synthetic  # noqa: E402
from dicomai.config import Settings  # noqa: E402
from dicomai.db import make_session_factory  # noqa: E402
from dicomai.jobs import reads  # noqa: E402
from dicomai.runtime.daemon import Daemon  # noqa: E402
from dicomai_tools.local_pacs import LocalPacs  # noqa: E402
from dicomai.jobs.states import JobState# noqa: E402
from dicomai.ops.scu import send_files  # noqa: E402

from _daemon import bench_settings  # noqa: E402


def _settings(tmp: Path, pacs_port: int, fifo: bool) -> Settings:
    settings = bench_settings(tmp, pacs_port)
    if fifo:
        settings = settings.model_copy(update={
            "routes": [r.model_copy(update={"priority": 0}) for r in settings.routes]})
    return settings


def _wait_results(pacs: LocalPacs, study_uid: str, expected: int, start: float,
                  timeout: float = 1800.0) -> float:
    while len(pacs.objects(study_uid)) < expected:
        if time.monotonic() - start > timeout:
            raise TimeoutError(study_uid)
        time.sleep(0.01)
    return time.monotonic() - start


def _ct_latency(daemon: Daemon, pacs: LocalPacs, files: list[Path], study_uid: str) -> float:
    before = len(pacs.objects(study_uid))
    assert send_files(files, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI",
                      calling_ae="CT01").ok
    return _wait_results(pacs, study_uid, before + 2, time.monotonic())


def _waiting(daemon: Daemon) -> int:
    sessions = make_session_factory(daemon.engine)
    return len(reads.jobs_for(sessions, states=[JobState.RECEIVING, JobState.QUEUED]))


def _scenario(tmp: Path, pacs: LocalPacs, args: argparse.Namespace, fifo: bool,
              ct_sets: list[tuple[list[Path], str]], chest_files: list[Path]) -> dict[str, Any]:
    daemon = Daemon(_settings(tmp, pacs.port, fifo))
    daemon.start()
    try:
        idle = [_ct_latency(daemon, pacs, files, uid) for files, uid in ct_sets[:args.repeats]]
        # The backlog: every chest X-ray received (and closed early: one image, released).
        assert send_files(chest_files, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI",
                          calling_ae="CR01").ok
        deadline = time.monotonic() + 60
        while (reads.jobs_for(make_session_factory(daemon.engine), states=[JobState.RECEIVING])
               and time.monotonic() < deadline):
            time.sleep(0.05)
        backlog_at_send = _waiting(daemon)
        files, uid = ct_sets[args.repeats]
        loaded = _ct_latency(daemon, pacs, files, uid)
        backlog_after = _waiting(daemon)
    finally:
        daemon.stop(30)
    return {
        "idle_s": [round(x, 2) for x in idle],
        "idle_p50_s": round(statistics.median(idle), 2),
        "under_backlog_s": round(loaded, 2),
        "backlog_when_ct_sent": backlog_at_send,
        "backlog_when_ct_done": backlog_after,
        "ratio": round(loaded / statistics.median(idle), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backlog", type=int, default=100, help="chest X-ray studies queued first")
    ap.add_argument("--slices", type=int, default=200, help="brain CT slices (512²)")
    ap.add_argument("--chest-size", type=int, nargs=2, default=(2000, 2500),
                    metavar=("ROWS", "COLS"))
    ap.add_argument("--repeats", type=int, default=2, help="idle CT measurements")
    ap.add_argument("--fifo", action="store_true", help="also run with every priority at 0")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dicomai-priority-"))
    pacs = LocalPacs(ae_title="PACS").start()
    rows, cols = args.chest_size
    runs = [("priority", False)] + ([("fifo", True)] if args.fifo else [])
    figures: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    try:
        for label, fifo in runs:
            seed = 1000 if not fifo else 5000
            ct_sets = []
            for i in range(args.repeats + 1):
                ct = synthetic.make_head_ct(args.slices, rows=512, cols=512, seed=seed + i)
                ct_sets.append((synthetic.write_study(ct, tmp / "in" / f"{label}-ct{i}"),
                                ct[0].StudyInstanceUID))
            chest = [synthetic.make_xray("chest", rows=rows, cols=cols, seed=seed + 100 + i)
                     for i in range(args.backlog)]
            chest_files = synthetic.write_study(chest, tmp / "in" / f"{label}-chest")
            figures[label] = _scenario(tmp / label, pacs, args, fifo, ct_sets, chest_files)
    finally:
        pacs.stop()
    figures["machine"]["load"] = round(os.getloadavg()[0], 2)
    print(f"machine: {os.cpu_count()} CPUs, load {figures['machine']['load']}; brain CT "
          f"{args.slices} slices, backlog {args.backlog} chest X-rays {rows}x{cols}")
    for label, _ in runs:
        f = figures[label]
        print(f"{label:<9} idle p50 {f['idle_p50_s']:.2f}s {f['idle_s']}, under backlog "
              f"{f['under_backlog_s']:.2f}s = {f['ratio']:.2f}x idle (target <= 2x); "
              f"backlog waiting when sent {f['backlog_when_ct_sent']}, "
              f"when done {f['backlog_when_ct_done']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
