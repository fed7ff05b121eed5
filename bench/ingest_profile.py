#!/usr/bin/env python
"""Where does dicomai's receiver spend its time per C-STORE? (companion of bench/ingest.py)

Runs a real ``Daemon(settings, roles=["receiver"])`` in this process with perf_counter
instrumentation monkeypatched around the steps of ``handle_store`` (nothing in dicomai/ is
edited), sends the bench data with DCMTK storescu, and prints a per-image breakdown in ms.
``--cprofile`` additionally profiles every thread (pynetdicom's DUL and association
reactors included) with cProfile and prints the top functions.

    .venv/bin/python bench/ingest_profile.py [--source /tmp/dicomai-proto] [--cprofile]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default=str(REPO), help="import dicomai from here")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--scenarios", default="small100_1assoc,ct500_1assoc,ct500_4assoc")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--callers", help="also print the callers of functions matching this")
    args = ap.parse_args()
    sys.path[:0] = [args.source, str(HERE)]
    import ingest  # bench/ingest.py: data generation, storescu driver, scenarios

    import pynetdicom.events as pevents

    try:  # the receive path's package (2026-12-03 on); older copies: dicomai.receiver
        import dicomai.ingest.record as record_mod
        import dicomai.ingest.scp as scp_mod
        import dicomai.ingest.store_instance as recv_mod
    except ImportError:
        import dicomai.receiver as recv_mod
        record_mod = scp_mod = recv_mod
    import dicomai.ingest.spool as store_mod
    from dicomai.config import load_settings
    from dicomai.runtime.daemon import Daemon
    from dicomai.logs import configure
    try:  # the instance index (2026-12-04 on); older copies record through the queue
        from dicomai.ingest.index import InstanceIndex as Index
    except ImportError:
        from dicomai.jobs.queue import Queue as Index
    from dicomai.ingest.spool import Spool

    print(f"dicomai from {Path(recv_mod.__file__).parent}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="bench-prof-"))
    configure(level="INFO", fmt="json", file=str(tmp / "dicomai.log"))
    import logging
    for h in logging.getLogger().handlers:  # keep stderr quiet; the file handler stays
        if getattr(h, "stream", None) is sys.stderr:
            logging.getLogger().removeHandler(h)

    # ---- instrumentation ------------------------------------------------------------
    acc: dict[str, list[float]] = collections.defaultdict(list)
    lock = threading.Lock()

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                with lock:
                    acc[name].append(dt)
        wrapper.__wrapped__ = fn
        return wrapper

    last_end: dict[int, float] = {}
    # Both C-STORE paths (pynetdicom's EVT_C_STORE and dicomai.ingest.fast_store) call
    # store_instance(req, ...); older copies only have the event handler handle_store.
    store_name = "store_instance" if hasattr(recv_mod, "store_instance") else "handle_store"
    orig_store = getattr(recv_mod, store_name)

    def store(first, *a):
        t0 = time.perf_counter()
        key = first.assoc_key if hasattr(first, "assoc_key") else id(first.assoc)
        if key in last_end:
            with lock:
                acc["between handlers (pynetdicom+net+sender)"].append(t0 - last_end[key])
        try:
            return orig_store(first, *a)
        finally:
            t1 = time.perf_counter()
            last_end[key] = t1
            with lock:
                acc["handle_store total"].append(t1 - t0)

    setattr(recv_mod, store_name, store)
    setattr(scp_mod, store_name, store)  # the name the receiver calls
    for name, label in (("_read", "  dataset read (raw)"),
                        ("_check", "  convert all + check (overlaps the write)"),
                        ("_write_pending", "  _write_pending (write; fsync on io thread)")):
        if hasattr(recv_mod, name):
            setattr(recv_mod, name, timed(label, getattr(recv_mod, name)))
    if hasattr(Spool, "publish"):
        Spool.publish = timed("  spool.publish (rename + fsync dir)", Spool.publish)
    recv_mod.extract_record = timed("  extract_record", record_mod.extract_record)
    pevents.Event._get_dataset = timed("  event.dataset decode", pevents.Event._get_dataset)
    pevents.Event.encoded_dataset = timed("  event.encoded_dataset()",
                                          pevents.Event.encoded_dataset)
    Index.has_instance = timed("  queue.has_instance", Index.has_instance)
    Index.known_instance = timed("  queue.known_instance", Index.known_instance)
    Index.record_instance = timed("  queue.record_instance (+ commit)",
                                  Index.record_instance)
    if hasattr(recv_mod, "_write_instance"):
        recv_mod._write_instance = timed("  _write_instance (meta + write_atomic)",
                                         recv_mod._write_instance)
    Spool.free_bytes = timed("  spool.free_bytes", Spool.free_bytes)
    Spool.write_atomic = timed("  spool.write_atomic", Spool.write_atomic)
    store_mod._fsync_dir = timed("    fsync(dir)", store_mod._fsync_dir)
    real_fsync = os.fsync
    tl = threading.local()

    def fsync(fd):
        # os.fsync of the data file (write_atomic); _fsync_dir is timed separately
        return timed("    fsync(file)" if not getattr(tl, "in_dir", False) else "_", real_fsync)(fd)

    orig_dir = store_mod._fsync_dir

    def fsync_dir(path):
        tl.in_dir = True
        try:
            return orig_dir(path)
        finally:
            tl.in_dir = False

    store_mod._fsync_dir = fsync_dir
    store_mod.os.fsync = fsync  # store.py uses `os.fsync` via the os module

    import sqlite3  # the real COMMIT (WAL append + fsync with synchronous=FULL)
    from sqlalchemy.engine import default as sa_default
    sa_default.DefaultDialect.do_commit = timed("    sqlite COMMIT (WAL fsync)",
                                                sa_default.DefaultDialect.do_commit)

    # ---- optional cProfile of all threads -------------------------------------------
    profiles: list[cProfile.Profile] = []
    if args.cprofile:
        def hook(frame, event, arg):
            p = cProfile.Profile()
            profiles.append(p)
            p.enable()  # replaces this hook for the thread
        threading.setprofile(hook)

    # ---- run ------------------------------------------------------------------------
    data = ingest.generate_data(tmp / "data")
    scen = {s.name: s for s in ingest.SCENARIOS}
    for name in args.scenarios.split(","):
        s = scen[name]
        ds = data[s.data]
        for phase in ("warm", "measure"):
            acc.clear()
            last_end.clear()
            ddir = tmp / f"{name}-{phase}"
            cfg = Path(recv_mod.__file__).parents[2 if "ingest" in recv_mod.__name__ else 1] / "config" / "dicomai.toml"
            settings = load_settings(cfg, environ={}, overrides={
                "general": {"data_dir": str(ddir)},
                "receiver": {"port": 0, "min_free_disk_mb": 0, "host": "127.0.0.1"}})
            d = Daemon(settings, roles=["receiver"])
            d.start()

            class R(ingest.ReceiverBase):
                label, ae, port = "dicomai", "DICOMAI", d.receiver.port

            files = ds.files if phase == "measure" else ds.files[:20]
            os.sync()
            if phase == "measure" and args.cprofile:
                profiles.clear()
            dt = ingest.send(R(), files, s.associations, s.nodelay)
            d.stop(10)
            shutil.rmtree(ddir, ignore_errors=True)
        n = len(files)
        print(f"\n== {name}: {n} images in {dt:.3f}s = {n / dt:.1f} img/s, "
              f"{1000 * dt / n:.2f} ms/img wall"
              + (f" ({s.associations} assocs: per-assoc {1000 * dt * s.associations / n:.2f} "
                 "ms/img)" if s.associations > 1 else ""))
        print(f"{'step':48s} {'calls':>6s} {'mean ms':>8s} {'p50 ms':>8s} {'ms/img':>8s}")
        order = ["between handlers (pynetdicom+net+sender)", "handle_store total",
                 "  dataset read (raw)", "  event.dataset decode", "  extract_record",
                 "  queue.has_instance",
                 "  queue.known_instance", "  spool.free_bytes",
                 "  convert all + check (overlaps the write)",
                 "  _write_pending (write; fsync on io thread)",
                 "  spool.publish (rename + fsync dir)",
                 "  event.encoded_dataset()", "  _write_instance (meta + write_atomic)",
                 "  spool.write_atomic", "    fsync(file)", "    fsync(dir)",
                 "  queue.record_instance (+ commit)", "    sqlite COMMIT (WAL fsync)"]
        for k in order:
            v = acc.get(k)
            if not v:
                continue
            v2 = sorted(v)
            print(f"{k:48s} {len(v):6d} {1000 * sum(v) / len(v):8.3f} "
                  f"{1000 * v2[len(v2) // 2]:8.3f} {1000 * sum(v) / n:8.3f}")
        if args.cprofile and profiles:
            st = None
            for p in profiles:
                try:
                    p.create_stats()
                except Exception:  # noqa: BLE001
                    continue
                if not p.stats:
                    continue
                st = pstats.Stats(p) if st is None else (st.add(p) or st)
            if st is not None:
                buf = io.StringIO()
                st.stream = buf
                st.sort_stats("tottime").print_stats(args.top)
                print("\n".join(buf.getvalue().splitlines()[6:]))
                if args.callers:
                    buf = io.StringIO()
                    st.stream = buf
                    st.print_callers(args.callers)
                    print("\n".join(buf.getvalue().splitlines()[4:]))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
