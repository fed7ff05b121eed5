"""End-to-end latency benchmark: last instance acknowledged → last result acknowledged.

Runs the real daemon in-process (SQLite, reference models, CPU) and a local Storage SCP as the
destination, sends studies one at a time with pynetdicom, and prints p50/p95 of

* total latency (what a radiologist waits for after the modality finished),
* the wait for the study to close (early close after the association's release or a complete
  acquisition, else the quiet period), read from the job's ``closed_at``, and
* the rest: routing, loading, inference, result objects and their C-STORE,

for single-image chest X-rays and a 200-slice head CT. Not a test: it prints figures.

    .venv/bin/python bench/latency.py [--chest 50] [--ct 3] [--quiet 30] [--no-early-close]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from dicomai_tools import synthetic  # noqa: E402
from dicomai.db import make_session_factory  # noqa: E402
from dicomai.jobs import reads  # noqa: E402
from dicomai.runtime.daemon import Daemon  # noqa: E402
from dicomai_tools.local_pacs import LocalPacs  # noqa: E402
from dicomai.ops.scu import send_files  # noqa: E402

from _daemon import bench_settings  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _run(daemon: Daemon, pacs: LocalPacs, files: list[Path], study_uid: str,
         expected: int, timeout: float = 900.0) -> tuple[float, float]:
    """(total seconds, seconds until the study closed), both from the last acknowledgement."""
    before = len(pacs.objects(study_uid))
    assert send_files(files, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok
    acked, acked_wall = time.monotonic(), datetime.now(UTC)
    deadline = acked + timeout
    while len(pacs.objects(study_uid)) < before + expected:
        if time.monotonic() > deadline:
            raise TimeoutError(study_uid)
        time.sleep(0.005)
    total = time.monotonic() - acked
    (job,) = reads.jobs_for(make_session_factory(daemon.engine), study_uids=[study_uid])[-1:]
    closed = job.closed_at.replace(tzinfo=UTC) if job.closed_at.tzinfo is None else job.closed_at
    return total, max(0.0, (closed - acked_wall).total_seconds())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chest", type=int, default=50, help="chest X-ray studies")
    parser.add_argument("--ct", type=int, default=3, help="200-slice head CT studies")
    parser.add_argument("--quiet", type=float, default=30.0, help="study_quiet_seconds")
    parser.add_argument("--no-early-close", action="store_true",
                        help="scheduler.early_close = false: every study waits --quiet")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dicomai-latency-"))
    pacs = LocalPacs(ae_title="PACS").start()
    settings = bench_settings(tmp, pacs.port, scheduler={
        "study_quiet_seconds": args.quiet, "early_close": not args.no_early_close})
    daemon = Daemon(settings)
    daemon.start()
    figures: dict[str, dict[str, float]] = {}
    try:
        cases = {
            "chest_xray": [([synthetic.make_xray("chest", rows=2000, cols=2500, seed=i)], 2)
                           for i in range(args.chest)],
            "head_ct_200": [(synthetic.make_head_ct(200, rows=512, cols=512, seed=100 + i), 6)
                            for i in range(args.ct)],
        }
        for name, studies in cases.items():
            totals, waits = [], []
            for datasets, expected in studies:
                files = synthetic.write_study(datasets, tmp / "in" / datasets[0].StudyInstanceUID)
                total, wait = _run(daemon, pacs, files, datasets[0].StudyInstanceUID, expected)
                totals.append(total)
                waits.append(wait)
            processing = [t - w for t, w in zip(totals, waits, strict=True)]
            figures[name] = {
                "studies": len(totals),
                "p50_total_s": round(statistics.median(totals), 3),
                "p95_total_s": round(_pct(totals, 0.95), 3),
                "p50_close_wait_s": round(statistics.median(waits), 3),
                "p95_close_wait_s": round(_pct(waits, 0.95), 3),
                "p50_without_quiet_s": round(statistics.median(processing), 3),
                "p95_without_quiet_s": round(_pct(processing, 0.95), 3),
                "quiet_period_s": args.quiet,
                "early_close": not args.no_early_close,
            }
    finally:
        daemon.stop(10)
        pacs.stop()
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; quiet period "
          f"{args.quiet}s, early close {'off' if args.no_early_close else 'on'}")
    print(f"{'case':<12} {'n':>3} {'p50 total':>10} {'p95 total':>10} {'p50 close':>10} "
          f"{'p95 close':>10} {'p50 w/o close':>14} {'p95 w/o close':>14}")
    for name, f in figures.items():
        print(f"{name:<12} {f['studies']:>3} {f['p50_total_s']:>9.2f}s {f['p95_total_s']:>9.2f}s "
              f"{f['p50_close_wait_s']:>9.2f}s {f['p95_close_wait_s']:>9.2f}s "
              f"{f['p50_without_quiet_s']:>13.2f}s {f['p95_without_quiet_s']:>13.2f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
