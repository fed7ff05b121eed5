#!/usr/bin/env python
"""Ingest benchmark: DCMTK storescu -> {storescp, Orthanc, dicomai receiver}.

Not a test. Generates the data sets once, starts the three receivers on loopback, then for
every repeat runs every scenario against every receiver, interleaved (the receiver order
rotates per repeat), so that load from other users of the machine hits all peers alike.
Reports the median wall time of the sending storescu process(es) as images/s and MB/s, and
the ratios dicomai/Orthanc and dicomai/storescp.

Usage::

    .venv/bin/python bench/ingest.py                 # 3 repeats, table on stdout
    .venv/bin/python bench/ingest.py -n 5 --json out.json
    .venv/bin/python bench/ingest.py --extra-dicomai proto=/tmp/dicomai-proto

Receivers
    storescp  DCMTK storescp --fork, writes files to a temp dir (no fsync: the ceiling).
    orthanc   Orthanc with a minimal config: SQLite index in a temp dir, default
              SyncStorageArea=true, MaximumPduLength=16384; started with TCP_NODELAY=1.
    dicomai   a real dicomai.runtime.daemon.Daemon(settings, roles=["receiver"]) in a child process
              (as ``dicomai serve --only receiver`` would run it), SQLite, min_free_disk_mb=0,
              logging configured as in production (INFO, json, to a log file).
              A fresh data dir is used for every measurement (duplicates would be answered
              Success without storing).
    dicomai-Np  the same with ``[receiver] processes = N`` (``--dicomai-processes``, default
              1): only for older copies (``--extra-dicomai``) that still had receiver
              processes; the key is retired and ignored since 2026-12-03.

Storage is cleared before every measurement (storescp: files removed; Orthanc: all
patients deleted via REST; dicomai: restarted on a new data dir) and ``sync`` is called so
that write-back of the previous run does not bleed into the next one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SENDER_AET = "BENCHSCU"

# targets of the "Fast path" issue: dicomai / Orthanc images/s
TARGETS = {
    "ct500_1assoc": 1.2,
    "small100_1assoc": 1.0,
    "ct500_4assoc": 1.0,
    "small100_1assoc_nagle": 5.0,
}


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open in {timeout}s")


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in out.splitlines():
        if line.strip():
            return line.strip()
    return "?"


def machine_info() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import pydicom
    import pynetdicom

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "dcmtk": tool_version(["storescu", "--version"]),
        "orthanc": tool_version(["Orthanc", "--version"]),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
@dataclass
class DataSet:
    name: str
    files: list[Path]
    nbytes: int


def generate_data(root: Path) -> dict[str, DataSet]:
    """500 CT slices 512x512 16-bit, and 100 small CR images (64x64) in 10 studies."""
    sys.path.insert(0, str(REPO))
    from dicomai_tools.synthetic import derive_uid, make_head_ct, make_xray, write_study

    ct_dir, small_dir = root / "ct500", root / "small100"
    ct = write_study(make_head_ct(500, rows=512, cols=512, slice_thickness=0.5), ct_dir)
    smalls = []
    for i in range(100):
        study = derive_uid("bench-small-study", i // 10)
        smalls.append(make_xray("chest", modality="CR", rows=64, cols=64, seed=i,
                                study_uid=study, series_uid=derive_uid("bench-small-series", i)))
    small = write_study(smalls, small_dir)
    return {
        "ct500": DataSet("ct500", ct, sum(p.stat().st_size for p in ct)),
        "small100": DataSet("small100", small, sum(p.stat().st_size for p in small)),
    }


# ------------------------------------------------------------------------------------------
# receivers
# ------------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int | None) -> float:
    """user+sys CPU seconds of a process, its threads and its reaped children."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(x) for x in fields[11:15]) / _TICK


def tree_cpu(pid: int | None) -> float:
    """:func:`proc_cpu` of a process plus that of its live descendants (dicomai's receiver
    processes)."""
    if pid is None:
        return float("nan")
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        cpu = proc_cpu(p)
        if cpu == cpu:  # not NaN (a process that just ended)
            total += cpu
        todo.extend(parents.get(p, []))
    return total


class ReceiverBase:
    label = "?"
    ae = "?"
    port = 0
    proc: Any = None

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid if self.proc else None)

    def start(self) -> None: ...
    def reset(self) -> None: ...
    def count(self) -> int: return -1
    def stop(self) -> None: ...


class StoreScp(ReceiverBase):
    label, ae = "storescp", "STORESCP"

    def __init__(self, work: Path) -> None:
        self.dir = work / "storescp"
        self.dir.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = free_port()
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen(
            ["storescp", "--fork", "-aet", self.ae, "+xa", "-od", str(self.dir), str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def reset(self) -> None:
        for p in self.dir.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    def count(self) -> int:
        return sum(1 for _ in self.dir.iterdir())

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)


class Orthanc(ReceiverBase):
    label, ae = "orthanc", "ORTHANC"

    def __init__(self, work: Path) -> None:
        self.dir = work / "orthanc"
        self.dir.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = 0

    def _rest(self, method: str, path: str) -> Any:
        req = urllib.request.Request(f"http://{HOST}:{self.http}{path}", method=method)
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
        return json.loads(body) if body else None

    def start(self) -> None:
        self.port, self.http = free_port(), free_port()
        cfg = {
            "Name": "bench",
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"),
            "DicomAet": self.ae,
            "DicomPort": self.port,
            "HttpPort": self.http,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "SaveJobs": False,
            "StableAge": 3600,
        }
        path = self.dir / "orthanc.json"
        path.write_text(json.dumps(cfg, indent=1))
        env = dict(os.environ, TCP_NODELAY="1")
        self.log = open(self.dir / "orthanc.log", "wb")
        self.proc = subprocess.Popen(["Orthanc", str(path)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                self._rest("GET", "/system")
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("Orthanc did not start; see " + str(self.dir))
                time.sleep(0.1)
        wait_port(self.port)

    def reset(self) -> None:
        for pid in self._rest("GET", "/patients"):
            self._rest("DELETE", f"/patients/{pid}")

    def count(self) -> int:
        return int(self._rest("GET", "/statistics")["CountInstances"])

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(30)
            self.log.close()


class Dicomai(ReceiverBase):
    """The dicomai receiver in a child process (this script with --dicomai-child)."""

    ae = "DICOMAI"

    def __init__(self, work: Path, label: str = "dicomai", source: Path = REPO,
                 env: dict[str, str] | None = None, processes: int = 1) -> None:
        self.label = label
        self.processes = processes
        self.source = source
        self.env = env or {}
        self.dir = work / label
        self.dir.mkdir(parents=True)
        self.proc: subprocess.Popen[str] | None = None
        self.run = 0
        self.data: Path | None = None

    def _cmd(self, line: str) -> str:
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if not reply:
            raise RuntimeError(f"{self.label} child died; see {self.dir}/child.log")
        return reply

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=f"{self.source}{os.pathsep}{REPO}")
        env.pop("TCP_NODELAY", None)
        env["DICOMAI_BENCH_PROCESSES"] = str(self.processes)
        env.update(self.env)
        self.log = open(self.dir / "child.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--dicomai-child"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=env, cwd=str(self.dir))
        self.reset()

    def reset(self) -> None:
        old = self.data
        if old is not None:
            self._cmd("stop")
            shutil.rmtree(old, ignore_errors=True)
        self.run += 1
        self.data = self.dir / f"run{self.run}"
        self.port = int(self._cmd(f"start {self.data}").split()[1])

    def count(self) -> int:
        return int(self._cmd("count").split()[1])

    def stop(self) -> None:
        if self.proc:
            try:
                self._cmd("stop")
                self._cmd("quit")
            except (RuntimeError, BrokenPipeError):
                pass
            self.proc.wait(30)
            self.log.close()


def dicomai_child() -> int:
    """Runs dicomai's receiver; commands on stdin: start DIR | stop | count | quit."""
    import sqlite3

    from dicomai.config import load_settings
    from dicomai.logs import configure

    try:
        from dicomai.runtime.daemon import Daemon
    except ImportError:  # a copy from before the stage packages (2026-12-03)
        from dicomai.daemon import Daemon  # type: ignore[no-redef]  # older layout

    import dicomai

    configure(level="INFO", fmt="json")  # stderr -> child.log, as `dicomai serve` does
    print(f"dicomai from {Path(dicomai.__file__).parent}", file=sys.stderr, flush=True)
    daemon: Daemon | None = None
    data: Path | None = None
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "start":
            data = Path(args[0])
            overrides = {
                "general": {"data_dir": str(data)},
                "receiver": {"port": 0, "min_free_disk_mb": 0, "host": HOST},
                "logging": {"level": "INFO", "format": "json"},
            }
            processes = int(os.environ.get("DICOMAI_BENCH_PROCESSES", "1"))
            if processes > 1:  # [receiver] processes (an older copy has no such key)
                overrides["receiver"]["processes"] = processes
            # a prototype copy may carry its own config (its config.py may differ)
            cfg = Path(dicomai.__file__).parents[1] / "config" / "dicomai.toml"
            if not cfg.exists():
                cfg = REPO / "config" / "dicomai.toml"
            settings = load_settings(cfg, environ={}, overrides=overrides)
            daemon = Daemon(settings, roles=["receiver"])
            daemon.start()
            assert daemon.receiver is not None
            print(f"port {daemon.receiver.port}", flush=True)
        elif cmd == "stop":
            if daemon is not None:
                daemon.stop(10)
                daemon = None
            print("stopped", flush=True)
        elif cmd == "count":
            assert data is not None
            con = sqlite3.connect(data / "dicomai.db")
            n = con.execute("select count(*) from instances").fetchone()[0]
            con.close()
            print(f"count {n}", flush=True)
        elif cmd == "quit":
            print("bye", flush=True)
            return 0
    return 0


# ------------------------------------------------------------------------------------------
# scenarios
# ------------------------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    data: str
    associations: int
    nodelay: bool
    title: str


SCENARIOS = [
    Scenario("ct500_1assoc", "ct500", 1, True, "500 CT 512² slices, 1 assoc"),
    Scenario("small100_1assoc", "small100", 1, True, "100 small (64² CR), 1 assoc"),
    Scenario("ct500_4assoc", "ct500", 4, True, "500 CT slices, 4 concurrent assocs"),
    Scenario("small100_1assoc_nagle", "small100", 1, False,
             "100 small, 1 assoc, Nagle on (sender)"),
]


def split(files: list[Path], n: int) -> list[list[Path]]:
    k, r = divmod(len(files), n)
    out, i = [], 0
    for j in range(n):
        size = k + (1 if j < r else 0)
        out.append(files[i:i + size])
        i += size
    return out


def send(rcv: ReceiverBase, files: list[Path], n_assoc: int, nodelay: bool) -> float:
    env = dict(os.environ)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    else:
        env.pop("TCP_NODELAY", None)
    procs = []
    t0 = time.perf_counter()
    for group in split(files, n_assoc):
        cmd = ["storescu", "-aet", SENDER_AET, "-aec", rcv.ae, HOST, str(rcv.port),
               *map(str, group)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
    errs = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            errs.append(err.decode(errors="replace")[-2000:])
    dt = time.perf_counter() - t0
    if errs:
        raise RuntimeError(f"storescu -> {rcv.label} failed:\n" + "\n".join(errs))
    return dt


@dataclass
class Result:
    scenario: str
    receiver: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # receiver CPU seconds per run


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--repeats", type=int, default=3, help="measurements per cell (median)")
    ap.add_argument("--json", metavar="PATH", help="also write results as JSON ('-' = stdout)")
    ap.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS),
                    help="comma-separated subset of: " + ", ".join(s.name for s in SCENARIOS))
    ap.add_argument("--receivers", default="storescp,orthanc,dicomai",
                    help="comma-separated subset of storescp, orthanc, dicomai")
    ap.add_argument("--extra-dicomai", action="append", default=[], metavar="LABEL=PATH[@K=V,...]",
                    help="also bench a dicomai receiver imported from PATH (a prototype copy),"
                         " with extra environment variables K=V for its process")
    ap.add_argument("--dicomai-processes", default="1", metavar="N[,N...]",
                    help="bench dicomai with each of these [receiver] processes settings "
                         "(labels dicomai, dicomai-2p, ...)")
    ap.add_argument("--workdir", help="keep temp files here (default: a removed temp dir)")
    ap.add_argument("--dicomai-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dicomai_child:
        return dicomai_child()

    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"missing tool: {tool}", file=sys.stderr)
            return 2
    scenarios = [s for s in SCENARIOS if s.name in args.scenarios.split(",")]
    wanted = args.receivers.split(",")
    info = machine_info()
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    tmp.mkdir(parents=True, exist_ok=True)
    receivers: list[ReceiverBase] = []
    try:
        t0 = time.perf_counter()
        data = generate_data(tmp / "data")
        print(f"# data generated in {time.perf_counter() - t0:.1f}s: "
              + ", ".join(f"{d.name} {len(d.files)} files {d.nbytes / 1e6:.1f} MB"
                          for d in data.values()), file=sys.stderr)
        work = tmp / "recv"
        if "storescp" in wanted:
            receivers.append(StoreScp(work))
        if "orthanc" in wanted:
            receivers.append(Orthanc(work))
        if "dicomai" in wanted:
            for n in (int(x) for x in args.dicomai_processes.split(",") if x):
                receivers.append(Dicomai(work, label="dicomai" if n == 1 else f"dicomai-{n}p",
                                         processes=n))
        for spec in args.extra_dicomai:
            label, _, rest = spec.partition("=")
            path, _, envspec = rest.partition("@")
            env = dict(kv.split("=", 1) for kv in envspec.split(",") if kv)
            receivers.append(Dicomai(work, label=label, source=Path(path).resolve(), env=env))
        for r in receivers:
            r.start()
            print(f"# {r.label} listening on {HOST}:{r.port} AE {r.ae}", file=sys.stderr)

        # warm-up: one small association per receiver (page cache, lazy imports)
        for r in receivers:
            send(r, data["small100"].files[:5], 1, True)

        results = {(s.name, r.label): Result(s.name, r.label) for s in scenarios
                   for r in receivers}
        for rep in range(args.repeats):
            for s in scenarios:
                ds = data[s.data]
                k = rep % len(receivers)
                for r in receivers[k:] + receivers[:k]:
                    r.reset()
                    os.sync()
                    c0 = r.cpu()
                    dt = send(r, ds.files, s.associations, s.nodelay)
                    time.sleep(0.05)  # let the receiver finish its bookkeeping
                    cpu = r.cpu() - c0
                    n = r.count()
                    if n != len(ds.files):
                        raise RuntimeError(f"{r.label} stored {n}/{len(ds.files)} in {s.name}")
                    results[(s.name, r.label)].seconds.append(dt)
                    results[(s.name, r.label)].cpu.append(cpu)
                    print(f"# rep {rep + 1} {s.name:24s} {r.label:10s} {dt:7.3f}s "
                          f"{len(ds.files) / dt:7.1f} img/s  receiver CPU "
                          f"{1000 * cpu / len(ds.files):6.2f} ms/img", file=sys.stderr)
        info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    finally:
        for r in receivers:
            try:
                r.stop()
            except Exception as exc:  # noqa: BLE001
                print(f"# stopping {r.label}: {exc}", file=sys.stderr)
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- report ---------------------------------------------------------------------
    rows = []
    for s in scenarios:
        ds = data[s.data]
        row: dict[str, Any] = {"scenario": s.name, "title": s.title, "images": len(ds.files),
                               "megabytes": round(ds.nbytes / 1e6, 2),
                               "associations": s.associations, "sender_tcp_nodelay": s.nodelay,
                               "receivers": {}}
        for r in receivers:
            secs = results[(s.name, r.label)].seconds
            cpus = results[(s.name, r.label)].cpu
            med = statistics.median(secs)
            row["receivers"][r.label] = {
                "seconds": [round(x, 4) for x in secs], "median_s": round(med, 4),
                "images_per_s": round(len(ds.files) / med, 1),
                "mb_per_s": round(ds.nbytes / 1e6 / med, 1),
                "receiver_cpu_ms_per_image": round(1000 * statistics.median(cpus)
                                                   / len(ds.files), 3)}
        rec = row["receivers"]
        for label in [r.label for r in receivers if isinstance(r, Dicomai)]:
            if "orthanc" in rec:
                row[f"{label}_vs_orthanc"] = round(
                    rec[label]["images_per_s"] / rec["orthanc"]["images_per_s"], 3)
            if "storescp" in rec:
                row[f"{label}_share_of_storescp"] = round(
                    rec[label]["images_per_s"] / rec["storescp"]["images_per_s"], 3)
        row["target_vs_orthanc"] = TARGETS.get(s.name)
        rows.append(row)

    labels = [r.label for r in receivers]
    dlabels = [r.label for r in receivers if isinstance(r, Dicomai)]
    head = ["scenario"] + [f"{lb} img/s (MB/s) [cpu ms/img]" for lb in labels]
    for d in dlabels:
        head += [f"{d}/orthanc", f"{d}/storescp"]
    head.append("target")
    table = []
    for row in rows:
        cells = [row["scenario"]]
        for lb in labels:
            c = row["receivers"][lb]
            cells.append(f"{c['images_per_s']:.1f} ({c['mb_per_s']:.1f}) "
                         f"[{c['receiver_cpu_ms_per_image']:.2f}]")
        for d in dlabels:
            v = row.get(f"{d}_vs_orthanc")
            cells.append("-" if v is None else f"{v:.2f}x")
            v = row.get(f"{d}_share_of_storescp")
            cells.append("-" if v is None else f"{v * 100:.0f}%")
        t = row["target_vs_orthanc"]
        cells.append("-" if t is None else f">={t}x")
        table.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table, strict=True)]
    print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}; "
          f"load {' '.join(info['loadavg_start'])} -> {' '.join(info['loadavg_end'])}")
    print(f"versions: Python {info['python']}, pydicom {info['pydicom']}, pynetdicom "
          f"{info['pynetdicom']}, {info['dcmtk']}, {info['orthanc']}")
    print(f"median of {args.repeats} runs; storescu wall time (incl. its start-up and file scan);"
          " [receiver CPU ms per image, user+sys]")
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for cells in table:
        print(" | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))
    if args.json:
        out = json.dumps({"machine": info, "repeats": args.repeats, "scenarios": rows}, indent=2)
        if args.json == "-":
            print(out)
        else:
            Path(args.json).write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
