"""More receiver processes on the same port (``[receiver] processes``), for concurrent senders.

One Python process stores about one instance at a time: its interpreter lock holds it to about
one core however many associations are open. With ``processes = N``, the daemon's own
receiver and N - 1 child processes each listen on the receiver's port with ``SO_REUSEPORT``;
the kernel spreads incoming connections over them (by address and port, so one association
stays with one process). Every process stores durably and records in the shared database
before it answers Success, exactly as the daemon's own receiver does.

A child runs only the receiver: its own database engine and spool object, the daemon's logging
and audit settings. It reports each released association to the daemon through a pipe, so an
early close is as prompt as for the daemon's own associations. Children stop with the daemon
(SIGTERM, then a bounded wait) and stop by themselves when the daemon is gone. Their Prometheus
counters are their own (not served by the daemon's ``/metrics``).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomai.config import Settings
from dicomai.logs import log_fields

__all__ = ["ReceiverPool"]

logger = logging.getLogger(__name__)

_START_TIMEOUT = 60.0
_RELEASED = b"released"


class ReceiverPool:
    """``count`` child processes serving the receiver's ``port`` beside the daemon's own."""

    def __init__(self, settings: Settings, port: int, count: int) -> None:
        self.settings = settings
        self.port = port
        self.count = count
        #: Called (on a pool thread) when a child's association released its studies.
        self.on_release: Callable[[], None] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._readers: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    def start(self) -> None:
        """Start the children and wait until each listens; raises ``RuntimeError`` if one
        does not (the started ones are stopped)."""
        payload = pickle.dumps(self.settings)
        for i in range(self.count):
            # A fresh interpreter (python -m), not a fork of this threaded process.
            proc = subprocess.Popen(
                [sys.executable, "-m", "dicomai.receiver_pool", str(self.port), str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env())
            self._procs.append(proc)
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(payload)
                proc.stdin.close()
            except OSError:
                pass
            ready = _read_line(proc.stdout, _START_TIMEOUT)
            if ready != b"ready":
                self.stop()
                raise RuntimeError(f"receiver process {i + 1} did not start")
            reader = threading.Thread(target=self._read, args=(proc,),
                                      name=f"receiver-pool-{i + 1}", daemon=True)
            reader.start()
            self._readers.append(reader)
        logger.info("receiver processes started", extra=log_fields(
            "receiver.pool_started", processes=self.count + 1, port=self.port))

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == _RELEASED and self.on_release is not None:
                try:
                    self.on_release()
                except Exception:
                    logger.exception("release callback failed", extra=log_fields(
                        "association.release_mark_failed"))
        if not self._stopping.is_set():
            logger.error("receiver process ended", extra=log_fields(
                "receiver.pool_child_ended", pid=proc.pid, code=proc.wait()))

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child (each stops its receiver, bounded), then wait; kill stragglers."""
        self._stopping.set()
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout + 5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
            if proc.stdout is not None:
                proc.stdout.close()
        for reader in self._readers:
            reader.join(5.0)
        self._procs, self._readers = [], []


def _child_env() -> dict[str, str]:
    """The daemon's environment, with this package importable as it is here."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _read_line(stream: Any, timeout: float) -> bytes:
    """One line from a child's stdout, or b"" after ``timeout`` seconds."""
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline().strip()),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0] if line else b""


def main(argv: list[str] | None = None) -> int:
    """A receiver process: ``python -m dicomai.receiver_pool PORT DAEMON_PID``, the pickled
    settings on stdin; prints ``ready``, then ``released`` per released association; serves
    until SIGTERM or until the daemon is gone."""
    args = sys.argv[1:] if argv is None else argv
    port, parent_pid = int(args[0]), int(args[1])
    settings: Settings = pickle.loads(sys.stdin.buffer.read())  # from our own daemon
    out = sys.stdout.buffer

    from dicomai import audit
    from dicomai.db import make_engine, make_session_factory, utcnow
    from dicomai.logs import configure
    from dicomai.queue import Queue
    from dicomai.receiver import Receiver
    from dicomai.store import Spool

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the daemon, which stops us
    log = settings.logging
    configure(log.level, log.format, str(log.file) if log.file else None,
              levels=dict(log.levels))
    a = settings.audit
    audit.configure(settings.resolve(a.file) if a.file and str(a.file) else None,
                    syslog=a.syslog, syslog_address=a.syslog_address,
                    site=settings.general.site_name)
    engine = make_engine(settings.database_url, echo=settings.database.echo,
                         busy_timeout=settings.database.busy_timeout_seconds)
    lock = threading.Lock()

    def send(line: bytes) -> None:
        with lock:
            try:
                out.write(line + b"\n")
                out.flush()
            except (OSError, ValueError):  # the daemon is gone: we stop below
                stop.set()

    spool = Spool(settings.spool_path)
    receiver = Receiver(settings.receiver.model_copy(update={"port": port}),
                        spool, Queue(make_session_factory(engine)), utcnow, reuse_port=True)
    try:
        receiver.start()
        receiver.on_release = lambda: send(_RELEASED)
        send(b"ready")
        while not stop.wait(1.0):
            if os.getppid() != parent_pid:
                break
    finally:
        receiver.stop()
        spool.close()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
