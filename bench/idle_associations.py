"""Receiver CPU with idle associations open: what an open but silent association costs.

Starts a receiver-only daemon (in this process, from ``--source``), opens N associations to it
from a separate process (pynetdicom SCU, so its CPU is not counted), waits, and prints the
receiver process's CPU over ``--seconds`` as a percentage of one core. Run it for two copies
(``--source`` of each) in one sitting to compare.

    .venv/bin/python bench/idle_associations.py --source . --associations 16
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=".", help="import dicomai from this checkout")
    ap.add_argument("--associations", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    source = Path(args.source).resolve()
    sys.path.insert(0, str(source))
    from dicomai.config import load_settings
    from dicomai.runtime.daemon import Daemon

    data = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    settings = load_settings(source / "config" / "dicomai.toml", environ={}, overrides={
        "general": {"data_dir": str(data)}, "logging": {"level": "WARNING"},
        "receiver": {"port": 0, "min_free_disk_mb": 0, "network_timeout_seconds": 600,
                     "max_associations": max(16, args.associations)}})
    daemon = Daemon(settings, roles=["receiver"])
    daemon.start()
    assert daemon.receiver is not None
    peer = subprocess.Popen([sys.executable, "-c", f"""
import time
from pynetdicom import AE
from pynetdicom.sop_class import Verification
ae = AE("IDLE")
ae.add_requested_context(Verification)
held = [ae.associate("127.0.0.1", {daemon.receiver.port}, ae_title="DICOMAI")
        for _ in range({args.associations})]
print(sum(a.is_established for a in held), flush=True)
time.sleep(3600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        established = int((peer.stdout.readline() if peer.stdout else "0").strip() or 0)
        time.sleep(1.0)

        def cpu() -> float:
            r = resource.getrusage(resource.RUSAGE_SELF)
            return r.ru_utime + r.ru_stime

        c0, t0 = cpu(), time.monotonic()
        time.sleep(args.seconds)
        c1, t1 = cpu(), time.monotonic()
        print(f"{source}: {established} idle associations: receiver CPU "
              f"{100 * (c1 - c0) / (t1 - t0):.1f}% of one core over {t1 - t0:.1f} s")
    finally:
        peer.kill()
    os._exit(0)  # the held associations would otherwise hold the daemon's stop


if __name__ == "__main__":
    sys.exit(main())
