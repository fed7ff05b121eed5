"""Reliability fixtures: `dicomai serve` as a real process, DCMTK storescu, DB and RSS probes."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dicomai.config import Settings, load_settings
from dicomai.models.reference import REFERENCE_MODELS
from dicomai.ops.scu import echo
from dicomai.ops.status import collect
from tests.conftest import DEFAULT_CONFIG, free_port, tcp_listen
from tests.waiting import wait_until

#: One response line per C-STORE in `storescu -v` output.
_STORE_RSP = re.compile(r"Received Store Response \(([^)]*)\)")


def _listening(port: int) -> bool:
    """The port listens and answers C-ECHO. (Probing with a bare TCP connect would leave an
    acceptor thread waiting acse_timeout seconds for an A-ASSOCIATE-RQ, which holds up the
    receiver's stop; probing with C-ECHO alone logs a connection error per refused try.)"""
    return bool(tcp_listen(port)) and echo("127.0.0.1", port, called_ae="DICOMAI", timeout=5) == 0


def _keep_routes(text: str, keep: set[str]) -> str:
    """The config text without the ``[[routes]]`` tables not named in ``keep``."""
    parts = re.split(r"(?m)^(?=\[\[routes\]\]|\[models\.)", text)
    out = []
    for part in parts:
        if part.startswith("[[routes]]"):
            name = re.search(r'^name = "([^"]+)"', part, re.MULTILINE)
            assert name is not None
            if name.group(1) not in keep:
                continue
        out.append(part)
    return "".join(out)


class RelServe:
    """``python -m dicomai --config CFG serve`` in its own process group, on ``root``.

    The shipped config file, with the destination port and (optionally) the CT model's input
    size replaced, plus ``DICOMAI_<SECTION>__<KEY>`` environment overrides (as an operator
    would). The reference models are symlinks to the session-built ones.
    """

    def __init__(self, root: Path, model_dir: Path, pacs_port: int, *, quiet: float,
                 routes: Sequence[str] | None = None, ct_input_size: int | None = 128,
                 env: dict[str, str] | None = None, wrapper: Sequence[str] = ()) -> None:
        self.root = root
        self.port = free_port()
        self.log = root / "daemon.log"
        text = DEFAULT_CONFIG.read_text().replace("port = 4242", f"port = {pacs_port}")
        if routes is not None:  # only these routes: the daemon loads only their models
            text = _keep_routes(text, set(routes))
        if ct_input_size is not None:  # the CT model at 128 px keeps CT jobs short on 2 cores
            text = text.replace("input_size = 256, batch_size = 16",
                                f"input_size = {ct_input_size}, batch_size = 16")
        self.config = root / "dicomai.toml"
        self.config.write_text(text)
        for ref in REFERENCE_MODELS.values():
            link = root / "data" / "models" / ref.filename
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(model_dir / ref.filename, link)
        self.env = {
            "DICOMAI_GENERAL__DATA_DIR": str(root / "data"),
            "DICOMAI_RECEIVER__PORT": str(self.port),
            "DICOMAI_RECEIVER__MIN_FREE_DISK_MB": "0",
            "DICOMAI_SCHEDULER__STUDY_QUIET_SECONDS": str(quiet),
            "DICOMAI_SCHEDULER__POLL_SECONDS": "0.2",
            "DICOMAI_WORKER__POLL_SECONDS": "0.1",
            "DICOMAI_WORKER__HEARTBEAT_SECONDS": "1",
            "DICOMAI_SENDER__POLL_SECONDS": "0.1",
            "DICOMAI_SENDER__RETRY_BASE_SECONDS": "0.5",
            **(env or {}),
        }
        self.wrapper = list(wrapper)  # e.g. unshare: the daemon runs in a PID namespace
        self.settings: Settings = load_settings(self.config, environ=self.env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started: list[float] = []  # seconds from Popen to listening, per start

    # -- process ---------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> subprocess.Popen[bytes]:
        """Start the daemon and wait until its port accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        t0 = time.monotonic()
        with open(self.log, "ab") as err:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "dicomai", "--config", str(self.config),
                 "serve"],
                env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True,
            )
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited {proc.returncode}:\n{self.log_tail()}")
            return _listening(self.port)

        wait_until(up, timeout=timeout, interval=0.1, what="daemon listening")
        self.started.append(round(time.monotonic() - t0, 2))
        return proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        """SIGKILL the daemon's whole process group and reap it."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> tuple[int | None, float]:
        """SIGTERM the daemon; returns (exit code or None if still running, seconds)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, round(time.monotonic() - t0, 2)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    # -- state -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return collect(self.settings, limit=500)

    def study(self, study_uid: str) -> dict[str, Any] | None:
        for s in self.status()["studies"]:
            if s["study_instance_uid"] == study_uid:
                return s
        return None

    def wait_state(self, study_uid: str, state: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll `dicomai status` until the study's latest generation is in ``state``."""

        def check() -> dict[str, Any] | None:
            s = self.study(study_uid)
            if s and s["state"] in ("failed", "cancelled", "skipped") and s["state"] != state:
                raise AssertionError(f"study ended {s['state']}: {s['last_error']}")
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_tail()}")
            return s if s and s["state"] == state else None

        return wait_until(check, timeout=timeout, interval=0.1, what=f"study {state}")

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """A read on the daemon's SQLite file (a separate connection, as `status` does)."""
        db = self.settings.database_url.removeprefix("sqlite:///")
        if not Path(db).exists():
            return []
        conn = sqlite3.connect(db, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:  # table not created yet
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def instance_count(self, study_uid: str | None = None) -> int:
        if study_uid is None:
            rows = self.query("SELECT count(*) FROM instances")
        else:
            rows = self.query("SELECT count(*) FROM instances i JOIN studies s ON "
                              "s.id = i.study_id WHERE s.study_instance_uid = ?", study_uid)
        return int(rows[0][0]) if rows else 0

    def instances(self, study_uid: str) -> list[tuple[str, str, int]]:
        """(sop_instance_uid, path, generation) of every indexed instance of a study."""
        return [(r[0], r[1], r[2]) for r in self.query(
            "SELECT i.sop_instance_uid, i.path, j.generation FROM instances i "
            "JOIN studies s ON s.id = i.study_id JOIN jobs j ON j.id = i.job_id "
            "WHERE s.study_instance_uid = ?", study_uid)]

    def jobs(self, study_uid: str) -> list[tuple[int, int, str, int]]:
        """(job id, generation, state, attempts) of a study."""
        return [(r[0], r[1], r[2], r[3]) for r in self.query(
            "SELECT j.id, j.generation, j.state, j.attempts FROM jobs j JOIN studies s "
            "ON s.id = j.study_id WHERE s.study_instance_uid = ? ORDER BY j.generation",
            study_uid)]

    def results(self, job_id: int) -> list[tuple[str, str, str]]:
        """(kind, sop_instance_uid, state) of a job's result rows."""
        return [(r[0], r[1], r[2]) for r in self.query(
            "SELECT kind, sop_instance_uid, state FROM results WHERE job_id = ? ORDER BY id",
            job_id)]

    def job_events(self, job_id: int) -> list[tuple[str | None, str, str]]:
        return [(r[0], r[1], r[2]) for r in self.query(
            "SELECT src, dst, reason FROM job_events WHERE job_id = ? ORDER BY id", job_id)]


@pytest.fixture
def rel_serve(tmp_path: Path, model_dir: Path) -> Iterator[Callable[..., RelServe]]:
    """Factory of :class:`RelServe` daemons under ``tmp_path``; all are killed at teardown."""
    made: list[RelServe] = []

    def make(pacs_port: int, *, quiet: float, name: str = "d", **kwargs: Any) -> RelServe:
        root = tmp_path / name
        root.mkdir()
        serve = RelServe(root, model_dir, pacs_port, quiet=quiet, **kwargs)
        made.append(serve)
        return serve

    yield make
    for serve in made:
        serve.cleanup()


@dataclass
class RelStorescu:
    """A DCMTK ``storescu -v`` process sending files in the given order over one association."""

    proc: subprocess.Popen[str]
    files: list[Path]
    out: str = ""
    _reader: threading.Thread | None = field(default=None, repr=False)

    def wait(self, timeout: float = 120.0) -> int:
        rc = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(10)
        return rc

    @property
    def statuses(self) -> list[str]:
        """Response status texts, in sending order (``Success`` for an acknowledged file)."""
        return _STORE_RSP.findall(self.out)

    @property
    def acknowledged(self) -> list[Path]:
        """Files answered Success: storescu sends in argument order, one response each."""
        n = 0
        for st in self.statuses:
            if st != "Success":
                break
            n += 1
        return self.files[:n]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def rel_storescu(port: int, files: Sequence[Path], *, calling_ae: str = "MODALITY",
                 extra: Sequence[str] = ()) -> RelStorescu:
    """Start ``storescu`` (TCP_NODELAY on) sending ``files`` in order; output is collected."""
    files = list(files)
    proc = subprocess.Popen(
        ["storescu", "-v", "-aec", "DICOMAI", "-aet", calling_ae, *extra, "127.0.0.1",
         str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    run = RelStorescu(proc, files)

    def read() -> None:
        assert proc.stdout is not None
        chunks = []
        with proc.stdout:
            for line in proc.stdout:
                chunks.append(line)
                run.out = "".join(chunks)
        run.out = "".join(chunks)

    run._reader = threading.Thread(target=read, daemon=True)
    run._reader.start()
    return run


@pytest.fixture
def rel_storescu_runs() -> Iterator[list[RelStorescu]]:
    """Collects storescu runs a test starts; any still running at teardown is killed."""
    runs: list[RelStorescu] = []
    yield runs
    for run in runs:
        run.stop()


class RelRssSampler:
    """Samples VmRSS of a process (and an optional probe value) every ``interval`` seconds."""

    def __init__(self, pid: int, probe: Callable[[], int] | None = None,
                 interval: float = 0.5) -> None:
        self.pid = pid
        self.probe = probe
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (seconds, rss kB, probe value)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    @staticmethod
    def rss_kb(pid: int) -> int | None:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return None
        m = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
        return int(m.group(1)) if m else None

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.rss_kb(self.pid)
            if rss is None:
                return
            value = -1
            if self.probe is not None:
                try:
                    value = self.probe()
                except sqlite3.Error:
                    value = -1
            self.samples.append((round(time.monotonic() - self._t0, 2), rss, value))
            self._stop.wait(self.interval)

    def __enter__(self) -> RelRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def rel_report() -> Iterator[Callable[[str, Any], None]]:
    """Print measured figures at the end of a test (shown with ``pytest -s``)."""
    lines: list[str] = []

    def add(name: str, value: Any) -> None:
        lines.append(f"  {name}: {value}")

    yield add
    if lines:
        print("\n[reliability figures]\n" + "\n".join(lines))
