#!/usr/bin/env python
"""STOW-RS ingest benchmark: 500 CT slices into dicomai over DICOMweb, beside C-STORE into
dicomai and STOW-RS (and C-STORE) into Orthanc, in the same run.

Not a test. Generates the slices once, starts dicomai (receiver role, [dicomweb] enabled, in
a child process) and Orthanc (with its DICOMweb plugin), then for every repeat runs every
scenario, interleaved and in rotating order, so that load from other users of the machine
hits all peers alike. Reports the median wall time as images/s and MB/s and the ratios
dicomai STOW-RS / dicomai C-STORE and dicomai STOW-RS / Orthanc STOW-RS.

Usage::

    .venv/bin/python bench/stow.py                       # 3 repeats, table on stdout
    .venv/bin/python bench/stow.py -n 5 --json bench/results/stow-DATE.json

Scenarios
    stow_1req   one STOW-RS request carrying all 500 instances (multipart/related, streamed
                with chunked transfer encoding by this script: http.client, each file read
                as it is sent).
    stow_4req   four concurrent requests of 125 instances.
    cstore_1assoc  DCMTK storescu, one association (TCP_NODELAY on): the DIMSE reference.

Storage is cleared before every measurement (dicomai: restarted on a new data dir; Orthanc:
all patients deleted) and ``sync`` is called first. Every measurement checks that all 500
instances were stored.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from ingest import HOST, free_port, machine_info, tree_cpu, wait_port  # noqa: E402

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
BOUNDARY = "bench-stow-boundary-0c1d"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
SENDER_AET = "BENCHSCU"


# ------------------------------------------------------------------------------------------
# data and clients
# ------------------------------------------------------------------------------------------
def generate(root: Path, n: int) -> list[Path]:
    from dicomai_tools.synthetic import make_head_ct, write_study

    return write_study(make_head_ct(n, rows=512, cols=512, slice_thickness=0.5), root)


def _body(files: list[Path]) -> Iterator[bytes]:
    for f in files:
        yield (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
               + f.read_bytes() + b"\r\n")
    yield f"--{BOUNDARY}--\r\n".encode()


def stow(port: int, path: str, files: list[Path]) -> dict[str, Any]:
    """POST ``files`` as one streamed STOW-RS request; the response data set."""
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    try:
        conn.request("POST", path, body=_body(files), encode_chunked=True,
                     headers={"Content-Type": CONTENT_TYPE, "Accept": "application/dicom+json"})
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"STOW-RS {path}: HTTP {resp.status}: {raw[:300]!r}")
        return json.loads(raw) if raw else {}
    finally:
        conn.close()


def split(files: list[Path], n: int) -> list[list[Path]]:
    k, r = divmod(len(files), n)
    out, i = [], 0
    for j in range(n):
        size = k + (1 if j < r else 0)
        out.append(files[i:i + size])
        i += size
    return out


def stow_parallel(port: int, path: str, files: list[Path], requests: int) -> None:
    errors: list[BaseException] = []

    def one(group: list[Path]) -> None:
        try:
            stow(port, path, group)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(g,)) for g in split(files, requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def storescu(port: int, ae: str, files: list[Path]) -> None:
    run = subprocess.run(["storescu", "-aet", SENDER_AET, "-aec", ae, HOST, str(port),
                          *map(str, files)], env=dict(os.environ, TCP_NODELAY="1"),
                         capture_output=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"storescu -> {ae}: {run.stderr.decode(errors='replace')[-500:]}")


# ------------------------------------------------------------------------------------------
# receivers
# ------------------------------------------------------------------------------------------
class OrthancWeb:
    """Orthanc with the DICOMweb plugin: C-STORE on its DICOM port, STOW-RS on its HTTP one."""

    label, ae = "orthanc", "ORTHANC"

    def __init__(self, work: Path) -> None:
        self.dir = work / "orthanc"
        self.dir.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.http = 0

    def _rest(self, method: str, path: str) -> Any:
        req = urllib.request.Request(f"http://{HOST}:{self.http}{path}", method=method)
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
        return json.loads(body) if body else None

    def start(self) -> None:
        self.port, self.http = free_port(), free_port()
        cfg = {
            "Name": "bench", "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"), "DicomAet": self.ae,
            "DicomPort": self.port, "HttpPort": self.http, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": True,
            "DicomCheckCalledAet": False, "Plugins": [str(PLUGIN)], "SaveJobs": False,
            "StableAge": 3600, "HttpCompressionEnabled": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }
        path = self.dir / "orthanc.json"
        path.write_text(json.dumps(cfg, indent=1))
        self.log = open(self.dir / "orthanc.log", "wb")
        self.proc = subprocess.Popen(["Orthanc", str(path)], env=dict(os.environ, TCP_NODELAY="1"),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                self._rest("GET", "/system")
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("Orthanc did not start; see " + str(self.dir)) from None
                time.sleep(0.1)
        wait_port(self.port)

    def reset(self) -> None:
        for pid in self._rest("GET", "/patients"):
            self._rest("DELETE", f"/patients/{pid}")

    def count(self) -> int:
        return int(self._rest("GET", "/statistics")["CountInstances"])

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid if self.proc else None)

    def send(self, scenario: str, files: list[Path]) -> None:
        if scenario == "cstore_1assoc":
            storescu(self.port, self.ae, files)
        else:
            stow_parallel(self.http, "/dicom-web/studies", files, _requests(scenario))

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(30)
            self.log.close()


class Dicomai:
    """dicomai's receiver ([dicomweb] enabled) in a child process (--dicomai-child)."""

    label, ae = "dicomai", "DICOMAI"

    def __init__(self, work: Path) -> None:
        self.dir = work / "dicomai"
        self.dir.mkdir(parents=True)
        self.proc: subprocess.Popen[str] | None = None
        self.run = 0
        self.data: Path | None = None
        self.port = self.http = 0

    def _cmd(self, line: str) -> str:
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if not reply:
            raise RuntimeError(f"dicomai child died; see {self.dir}/child.log")
        return reply

    def start(self) -> None:
        self.log = open(self.dir / "child.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--dicomai-child"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(self.dir))
        self.reset()

    def reset(self) -> None:
        if self.data is not None:
            self._cmd("stop")
            shutil.rmtree(self.data, ignore_errors=True)
        self.run += 1
        self.data = self.dir / f"run{self.run}"
        _, dimse, web = self._cmd(f"start {self.data}").split()
        self.port, self.http = int(dimse), int(web)

    def count(self) -> int:
        return int(self._cmd("count").split()[1])

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid if self.proc else None)

    def send(self, scenario: str, files: list[Path]) -> None:
        if scenario == "cstore_1assoc":
            storescu(self.port, self.ae, files)
        else:
            stow_parallel(self.http, "/dicomweb/studies", files, _requests(scenario))

    def stop(self) -> None:
        if self.proc:
            try:
                self._cmd("stop")
                self._cmd("quit")
            except (RuntimeError, BrokenPipeError):
                pass
            self.proc.wait(30)
            self.log.close()


def _requests(scenario: str) -> int:
    return int(scenario.removeprefix("stow_").removesuffix("req"))


def dicomai_child() -> int:
    """dicomai's receiver with [dicomweb]; commands on stdin: start DIR | stop | count | quit."""
    import sqlite3

    from dicomai.config import load_settings
    from dicomai.runtime.daemon import Daemon
    from dicomai.logs import configure

    configure(level="INFO", fmt="json")  # stderr -> child.log, as `dicomai serve` does
    daemon: Daemon | None = None
    data: Path | None = None
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "start":
            data = Path(args[0])
            settings = load_settings(REPO / "config" / "dicomai.toml", environ={}, overrides={
                "general": {"data_dir": str(data)},
                "receiver": {"port": 0, "min_free_disk_mb": 0, "host": HOST},
                "dicomweb": {"enabled": True, "port": 0, "host": HOST},
                "logging": {"level": "INFO", "format": "json"}})
            daemon = Daemon(settings, roles=["receiver"])
            daemon.start()
            assert daemon.receiver is not None and daemon.dicomweb is not None
            print(f"ports {daemon.receiver.port} {daemon.dicomweb.port}", flush=True)
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
# main
# ------------------------------------------------------------------------------------------
SCENARIOS = ["stow_1req", "stow_4req", "cstore_1assoc"]


@dataclass
class Result:
    scenario: str
    receiver: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--repeats", type=int, default=3, help="measurements per cell (median)")
    ap.add_argument("--instances", type=int, default=500, help="CT slices (512x512, 16 bit)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--workdir", help="keep temp files here (default: a removed temp dir)")
    ap.add_argument("--dicomai-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dicomai_child:
        return dicomai_child()
    for tool in ("storescu", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"missing tool: {tool}", file=sys.stderr)
            return 2
    if not PLUGIN.exists():
        print(f"missing {PLUGIN} (apt: orthanc-dicomweb)", file=sys.stderr)
        return 2
    info = machine_info()
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-stow-"))
    tmp.mkdir(parents=True, exist_ok=True)
    receivers: list[Any] = []
    results: dict[tuple[str, str], Result] = {}
    try:
        t0 = time.perf_counter()
        files = generate(tmp / "ct", args.instances)
        nbytes = sum(f.stat().st_size for f in files)
        print(f"# {len(files)} slices, {nbytes / 1e6:.1f} MB, made in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
        receivers = [Dicomai(tmp / "recv"), OrthancWeb(tmp / "recv")]
        for r in receivers:
            r.start()
        for rep in range(args.repeats):
            order = receivers[rep % len(receivers):] + receivers[:rep % len(receivers)]
            for scenario in SCENARIOS:
                for r in order:
                    r.reset()
                    subprocess.run(["sync"], check=False)
                    cpu0 = r.cpu()
                    t = time.perf_counter()
                    r.send(scenario, files)
                    dt = time.perf_counter() - t
                    cpu = r.cpu() - cpu0
                    stored = r.count()
                    if stored != len(files):
                        raise RuntimeError(f"{r.label} {scenario}: {stored} of {len(files)}")
                    res = results.setdefault((scenario, r.label), Result(scenario, r.label))
                    res.seconds.append(dt)
                    res.cpu.append(cpu)
                    print(f"# rep {rep + 1} {scenario:<14} {r.label:<8} {dt:6.2f}s "
                          f"{len(files) / dt:6.0f} img/s  cpu {cpu:5.1f}s", file=sys.stderr)
    finally:
        for r in receivers:
            r.stop()
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)

    def med(scenario: str, receiver: str) -> float:
        return statistics.median(results[(scenario, receiver)].seconds)

    rows = []
    print(f"\n{'scenario':<14} {'receiver':<8} {'img/s':>7} {'MB/s':>7} {'s (median)':>10} "
          f"{'cpu s':>6}")
    for (scenario, receiver), res in results.items():
        s = statistics.median(res.seconds)
        row = {"scenario": scenario, "receiver": receiver, "seconds": res.seconds,
               "median_seconds": round(s, 3), "img_per_s": round(len(files) / s, 1),
               "mb_per_s": round(nbytes / 1e6 / s, 1),
               "cpu_seconds_median": round(statistics.median(res.cpu), 2)}
        rows.append(row)
        print(f"{scenario:<14} {receiver:<8} {row['img_per_s']:>7} {row['mb_per_s']:>7} "
              f"{s:>10.2f} {row['cpu_seconds_median']:>6}")
    ratios = {
        "dicomai_stow_1req_vs_dicomai_cstore": round(
            med("cstore_1assoc", "dicomai") / med("stow_1req", "dicomai"), 2),
        "dicomai_stow_4req_vs_dicomai_cstore": round(
            med("cstore_1assoc", "dicomai") / med("stow_4req", "dicomai"), 2),
        "dicomai_stow_1req_vs_orthanc_stow_1req": round(
            med("stow_1req", "orthanc") / med("stow_1req", "dicomai"), 2),
        "dicomai_stow_4req_vs_orthanc_stow_4req": round(
            med("stow_4req", "orthanc") / med("stow_4req", "dicomai"), 2),
        "dicomai_cstore_vs_orthanc_cstore": round(
            med("cstore_1assoc", "orthanc") / med("cstore_1assoc", "dicomai"), 2),
    }
    print("\nratios (images/s of the first over the second):")
    for k, v in ratios.items():
        print(f"  {k}: {v}")
    if args.json:
        out = {"benchmark": "stow", "date": time.strftime("%Y-%m-%d"), "machine": info,
               "instances": len(files), "bytes": nbytes, "repeats": args.repeats,
               "results": rows, "ratios": ratios,
               "loadavg_end": Path("/proc/loadavg").read_text().split()[:3]}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
