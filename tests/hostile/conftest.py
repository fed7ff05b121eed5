"""The daemon under attack: ``dicomai serve --config`` as its own process (tests.reliability's
:class:`RelServe`: the shipped config file, plus the ``DICOMAI_<SECTION>__<KEY>`` overrides of
:data:`ENV`), one per test module, with short timeouts so that stalls are dropped within
seconds, its reference models ready and warmed by one analysed study before the first attack.

:meth:`Target.attack` wraps each attack and checks what must hold through it: C-ECHO answered
within 5 s while the attack is held and after it; the resident memory of the daemon's process
tree within 200 MB of before; its threads back to the baseline afterwards.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dicomai_tools import synthetic
from dicomai_tools.local_pacs import LocalPacs
from dicomai.ops.scu import echo, send_files
from tests.conftest import skip_or_fail
from tests.hostile.probes import EchoProbe, TreeSampler, Usage, tree_usage
from tests.reliability.conftest import RelServe
from tests.waiting import let_time_pass, sample_until, wait_until

#: [receiver] settings of the daemon under attack (all set, so the figures below follow them).
ACSE_TIMEOUT = 3.0
NETWORK_TIMEOUT = 4.0
MAX_ASSOCIATIONS = 16
LISTEN_BACKLOG = 128
MAX_PENDING = 256
MAX_PENDING_PER_ADDRESS = 64
#: [scheduler]: a study closes 60 s after its last instance, or 1 s after its sender released.
STUDY_QUIET = 60.0
RELEASE_GRACE = 1.0

#: Seconds the daemon may take past one of its timeouts to drop a connection.
MARGIN = 4.0
#: A C-ECHO must be answered within this many seconds, during and after every attack.
ECHO_WITHIN = 5.0
#: The daemon's process tree may grow by at most this much resident memory during an attack.
RSS_BUDGET_MB = 200.0
#: Threads above the idle baseline still counted as "back to baseline" (the sender's pool
#: grows up to its ``threads`` as results go out).
THREAD_TOLERANCE = 4
#: How long threads may take to come back after an attack: every stalled connection is
#: dropped by then.
SETTLE_SECONDS = ACSE_TIMEOUT + NETWORK_TIMEOUT + 2 * MARGIN

ENV = {
    "DICOMAI_RECEIVER__ACSE_TIMEOUT_SECONDS": str(ACSE_TIMEOUT),
    "DICOMAI_RECEIVER__NETWORK_TIMEOUT_SECONDS": str(NETWORK_TIMEOUT),
    "DICOMAI_RECEIVER__MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS),
    "DICOMAI_RECEIVER__LISTEN_BACKLOG": str(LISTEN_BACKLOG),
    "DICOMAI_RECEIVER__MAX_PENDING_CONNECTIONS": str(MAX_PENDING),
    "DICOMAI_RECEIVER__MAX_PENDING_PER_ADDRESS": str(MAX_PENDING_PER_ADDRESS),
    "DICOMAI_SCHEDULER__RELEASE_GRACE_SECONDS": str(RELEASE_GRACE),
    "DICOMAI_LOGGING__FORMAT": "json",
}


@dataclass
class Watch:
    """What :meth:`Target.attack` measures while an attack runs."""

    before: Usage
    sampler: TreeSampler
    echoes: EchoProbe


@dataclass
class Target:
    """The daemon under attack, its PACS, and what it looked like idle."""

    serve: RelServe
    pacs: LocalPacs
    root: Path
    baseline: Usage

    @property
    def port(self) -> int:
        return self.serve.port

    @property
    def pid(self) -> int:
        return self.serve.pid

    # -- state ------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.serve.proc is not None and self.serve.proc.poll() is None

    def quarantine(self) -> list[tuple[str, int]]:
        """(reason, status) of every refused object, oldest first."""
        return [(str(r), int(s)) for r, s in
                self.serve.query("SELECT reason, status_code FROM quarantine ORDER BY id")]

    def stored(self, sop_instance_uid: str) -> bool:
        """An instance row exists for the SOP Instance UID."""
        return bool(self.serve.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?",
                                     sop_instance_uid))

    def state(self, study_uid: str) -> str | None:
        """The state of the study's latest job, None while the daemon knows no such study."""
        study = self.serve.study(study_uid)
        return None if study is None else str(study["state"])

    def files(self, name: str, datasets: Sequence[Any]) -> list[Path]:
        return synthetic.write_study(datasets, self.root / "studies" / name)

    # -- checks -----------------------------------------------------------------------------
    def echo_seconds(self) -> float:
        """C-ECHO once; fails unless answered Success within :data:`ECHO_WITHIN`."""
        started = time.monotonic()
        status = echo("127.0.0.1", self.port, called_ae="DICOMAI", timeout=ECHO_WITHIN)
        seconds = time.monotonic() - started
        assert status == 0x0000, f"C-ECHO answered {status!r} after {seconds:.1f} s"
        assert seconds < ECHO_WITHIN, f"C-ECHO took {seconds:.1f} s"
        return seconds

    def settle(self, timeout: float = SETTLE_SECONDS) -> Usage:
        """Wait (at most ``timeout``) for the threads to be back at the baseline; the usage
        then, whether or not they are."""
        return sample_until(lambda: tree_usage(self.pid),
                            lambda u: u.threads <= self.baseline.threads + THREAD_TOLERANCE,
                            timeout=timeout, interval=0.2)

    @contextmanager
    def attack(self) -> Iterator[Watch]:
        """Hold an attack in the ``with`` body; afterwards check, and report together, every
        rule it broke: C-ECHO during and after, memory, threads, the daemon alive."""
        self.settle()  # the previous attack's leftovers (if it failed) are not this one's
        before = tree_usage(self.pid)
        watch = Watch(before, TreeSampler(self.pid), EchoProbe(self.port, ECHO_WITHIN))
        watch.sampler.start()
        watch.echoes.start()
        try:
            yield watch
        except BaseException:
            watch.echoes.stop()
            watch.sampler.stop()
            raise
        watch.echoes.stop()
        if not self.alive():
            watch.sampler.stop()
            pytest.fail(f"the daemon died:\n{self.serve.log_tail()}")
        problems = []
        if not watch.echoes.results:
            problems.append("no C-ECHO was tried during the attack")
        elif failed := watch.echoes.failures():
            problems.append(f"C-ECHO during the attack: {len(failed)} of "
                            f"{len(watch.echoes.results)} not answered Success within "
                            f"{ECHO_WITHIN:.0f} s, (status, seconds): {failed[:5]}")
        try:
            self.echo_seconds()
        except AssertionError as exc:
            problems.append(f"C-ECHO after the attack: {exc}")
        after = self.settle()
        watch.sampler.stop()
        if after.threads > self.baseline.threads + THREAD_TOLERANCE:
            problems.append(f"threads not back to baseline {SETTLE_SECONDS:.0f} s after the "
                            f"attack: {after.threads} (baseline {self.baseline.threads}, "
                            f"peak {watch.sampler.peak_threads})")
        grown = max(watch.sampler.peak_rss_mb, after.rss_mb) - before.rss_mb
        tries = [t for _, t in watch.echoes.results]
        print(f"\n  C-ECHO during: {len(tries)} tries, slowest {max(tries, default=0):.2f} s; "
              f"RSS {before.rss_mb:.0f} -> peak {watch.sampler.peak_rss_mb:.0f} -> "
              f"{after.rss_mb:.0f} MB; threads {before.threads} -> peak "
              f"{watch.sampler.peak_threads} -> {after.threads} (baseline "
              f"{self.baseline.threads})")
        if grown > RSS_BUDGET_MB:
            problems.append(f"RSS of the daemon's processes grew by {grown:.0f} MB (before "
                            f"{before.rss_mb:.0f} MB, peak {watch.sampler.peak_rss_mb:.0f} MB,"
                            f" after {after.rss_mb:.0f} MB)")
        assert not problems, "\n".join(problems)

    def analyses_a_study(self, seed: int) -> dict[str, Any]:
        """A legitimate chest DX is stored and analysed (its job done, SR and SC at the
        PACS); returns its status entry."""
        ds = synthetic.make_xray("chest", modality="DX", view_position="PA", rows=128,
                                 cols=128, seed=seed)
        result = send_files(self.files(f"legit-{seed}", [ds]), "127.0.0.1", self.port,
                            called_ae="DICOMAI", calling_ae="MODALITY", timeout=10)
        assert result.ok, result.statuses
        status = self.serve.wait_state(ds.StudyInstanceUID, "done", timeout=60)
        wait_until(lambda: len(self.pacs.objects(ds.StudyInstanceUID)) >= 2, timeout=30,
                   what="SR and SC at the PACS")
        return status


@functools.cache
def dcmtk_storescu() -> str | None:
    """The first ``storescu`` on PATH that is DCMTK's (pynetdicom installs a ``storescu``
    of its own into the virtual environment's bin folder)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / "storescu"
        if not os.access(candidate, os.X_OK):
            continue
        try:
            out = subprocess.run([str(candidate), "--version"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return str(candidate)
    return None


def storescu(port: int, paths: Sequence[Path], within: float = 10.0) -> float:
    """DCMTK storescu sends ``paths`` over one association; fails unless every file is
    stored within ``within`` seconds. Returns the seconds it took."""
    program = dcmtk_storescu()
    if program is None:
        skip_or_fail("DCMTK storescu not installed")
    started = time.monotonic()
    try:
        run = subprocess.run(
            [program, "-aec", "DICOMAI", "-aet", "MODALITY", "-to", str(int(within)),
             "-ta", str(int(within)), "-td", str(int(within)), "127.0.0.1", str(port),
             *map(str, paths)],
            capture_output=True, text=True, timeout=within,
            env={**os.environ, "TCP_NODELAY": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"storescu did not finish within {within:.0f} s")
    seconds = time.monotonic() - started
    assert run.returncode == 0, f"storescu failed ({run.returncode}): {run.stderr[-2000:]}"
    assert seconds < within
    return seconds


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Target]:
    """``dicomai serve`` for this module's attacks: listening, models ready, one study
    analysed (so the worker's memory is warm), idle threads measured."""
    root = tmp_path_factory.mktemp("hostile")
    pacs = LocalPacs(ae_title="PACS").start()
    serve = RelServe(root, model_dir, pacs.port, quiet=STUDY_QUIET, env=ENV)
    started = time.monotonic()
    try:
        serve.start(timeout=120)
        listening = time.monotonic() - started

        def ready() -> bool:
            assert serve.proc is not None and serve.proc.poll() is None, serve.log_tail()
            return all(m["state"] == "ready" for m in serve.status()["models"])

        wait_until(ready, timeout=120, interval=0.5, what="the reference models ready")
        models = time.monotonic() - started
        target = Target(serve, pacs, root, tree_usage(serve.pid))
        target.analyses_a_study(seed=9001)
        let_time_pass(1.0, "the threads of the analysed study end")
        samples = []
        for _ in range(10):  # the idle floor, past any thread still ending
            samples.append(tree_usage(serve.pid))
            let_time_pass(0.2, "ten samples, 0.2 s apart")
        target.baseline = min(samples, key=lambda u: u.threads)
        print(f"\nhostile target: listening after {listening:.1f} s, models ready after "
              f"{models:.1f} s, idle after {time.monotonic() - started:.1f} s: "
              f"{target.baseline}")
        yield target
    finally:
        if serve.proc is not None and serve.proc.poll() is None:
            serve.terminate(30)
        serve.cleanup()
        pacs.stop()

