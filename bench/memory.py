"""Memory of ``dicomai serve`` over many studies: peak RSS and growth.

Starts the real ``dicomai serve`` (SQLite, bundled reference models on CPU) as a child process
with a copy of config/dicomai.toml, and a local Storage SCP in this process as the PACS. Sends
``--studies`` studies in waves (chest X-rays, hand X-rays and, every ``--ct-every`` studies, a
head CT), waits until each wave's results are all back, and samples the daemon's resident
memory (VmRSS) and peak (VmHWM) from /proc after each wave.

Prints the samples, the peak, and the growth between the first sample after warm-up and the
last (target: no growth over 1,000 studies). Not a test: it prints figures.

    .venv/bin/python bench/memory.py [--studies 1000] [--wave 50]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomai_tools import synthetic  # noqa: E402
from dicomai.config import load_settings  # noqa: E402
from dicomai_tools.local_pacs import LocalPacs  # noqa: E402
from dicomai.ops.scu import echo, send_files  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def _config(tmp: Path, pacs_port: int) -> Path:
    """config/dicomai.toml with data_dir, the PACS port and absolute model paths changed."""
    base = load_settings(REPO / "config" / "dicomai.toml", environ={})
    text = (REPO / "config" / "dicomai.toml").read_text()
    text = text.replace('data_dir = "../var"', f'data_dir = "{tmp / "data"}"', 1)
    text = text.replace("port = 4242", f"port = {pacs_port}", 1)
    for name, model in base.models.items():
        text = text.replace(f'path = "{model.path}"', f'path = "{base.model_path(name)}"', 1)
    path = tmp / "dicomai.toml"
    path.write_text(text)
    return path


def _studies(start: int, count: int, ct_every: int, tmp: Path) -> list[tuple[list[Path], str]]:
    out = []
    for i in range(start, start + count):
        if ct_every and i % ct_every == ct_every - 1:
            datasets = synthetic.make_head_ct(30, rows=256, cols=256, seed=20000 + i)
        elif i % 2:
            datasets = [synthetic.make_xray("hand", modality="CR", body_part="HAND",
                                            rows=600, cols=480, seed=20000 + i)]
        else:
            datasets = [synthetic.make_xray("chest", rows=1000, cols=800, seed=20000 + i)]
        uid = datasets[0].StudyInstanceUID
        out.append((synthetic.write_study(datasets, tmp / "in" / uid), uid))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=1000)
    ap.add_argument("--wave", type=int, default=50, help="studies sent before waiting")
    ap.add_argument("--ct-every", type=int, default=50, help="every Nth study is a head CT")
    ap.add_argument("--warmup-waves", type=int, default=2, help="waves before the baseline")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dicomai-memory-"))
    pacs = LocalPacs(ae_title="PACS").start()
    port = _free_port()
    env = dict(os.environ, DICOMAI_RECEIVER__PORT=str(port), DICOMAI_RECEIVER__MIN_FREE_DISK_MB="0",
               DICOMAI_SCHEDULER__POLL_SECONDS="0.2", DICOMAI_LOGGING__LEVEL="WARNING")
    cmd = [str(Path(sys.executable).with_name("dicomai")), "--config",
           str(_config(tmp, pacs.port)), "serve"]
    log = (tmp / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 120
        while echo("127.0.0.1", port, called_ae="DICOMAI") != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dicomai serve did not start; see {tmp / 'serve.log'}")
            time.sleep(0.5)
        samples.append({"studies": 0, "rss_mib": _proc_kib(proc.pid, "VmRSS") / 1024,
                         "hwm_mib": _proc_kib(proc.pid, "VmHWM") / 1024, "seconds": 0.0})
        started = time.monotonic()
        done = 0
        while done < args.studies:
            wave = _studies(done, min(args.wave, args.studies - done), args.ct_every, tmp)
            for files, _ in wave:
                assert send_files(files, "127.0.0.1", port, called_ae="DICOMAI",
                                  calling_ae="MODALITY").ok
            wait_until = time.monotonic() + 1800
            pending = {uid for _, uid in wave}
            while pending:
                if time.monotonic() > wait_until or proc.poll() is not None:
                    raise RuntimeError("results did not come back; see the serve log")
                got = {o.study_instance_uid for o in pacs.objects()}
                pending -= {uid for uid in pending
                            if uid in got and len(pacs.objects(uid)) >= 2}
                time.sleep(0.2)
            with pacs._lock:  # keep this process small: the objects were counted
                pacs.received.clear()
            for files, _ in wave:
                shutil.rmtree(files[0].parent, ignore_errors=True)
            done += len(wave)
            samples.append({"studies": done, "rss_mib": _proc_kib(proc.pid, "VmRSS") / 1024,
                            "hwm_mib": _proc_kib(proc.pid, "VmHWM") / 1024,
                            "seconds": round(time.monotonic() - started, 1)})
            print(f"{done:>5} studies  RSS {samples[-1]['rss_mib']:7.1f} MiB  peak "
                  f"{samples[-1]['hwm_mib']:7.1f} MiB  {samples[-1]['seconds']:7.1f} s",
                  flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        pacs.stop()
        log.close()
    base = samples[min(args.warmup_waves, len(samples) - 1)]
    last = samples[-1]
    figures = {
        "machine": {"cpus": os.cpu_count(), "load": round(os.getloadavg()[0], 2)},
        "studies": last["studies"],
        "peak_rss_mib": round(max(s["hwm_mib"] for s in samples), 1),
        "rss_after_warmup_mib": round(base["rss_mib"], 1),
        "rss_at_end_mib": round(last["rss_mib"], 1),
        "growth_mib": round(last["rss_mib"] - base["rss_mib"], 1),
        "growth_per_100_studies_mib": round(
            100 * (last["rss_mib"] - base["rss_mib"]) / max(1, last["studies"] - base["studies"]),
            2),
        "samples": samples,
    }
    print(f"machine: {os.cpu_count()} CPUs, load {figures['machine']['load']}; "
          f"{figures['studies']} studies in {last['seconds']} s")
    print(f"peak RSS {figures['peak_rss_mib']} MiB; RSS after {base['studies']} studies "
          f"{figures['rss_after_warmup_mib']} MiB, at {last['studies']} "
          f"{figures['rss_at_end_mib']} MiB: growth {figures['growth_mib']} MiB "
          f"({figures['growth_per_100_studies_mib']} MiB per 100 studies)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
