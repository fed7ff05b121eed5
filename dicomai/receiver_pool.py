"""More receiver processes for concurrent senders (``[receiver] processes``).

One Python process stores about one instance at a time: its interpreter lock holds it to about
one core however many associations are open. With ``processes = N`` the daemon starts N - 1
child processes that run only a receiver. The daemon alone listens on the port; it passes
each accepted connection (its descriptor, over a Unix socket) to the process with the fewest
open connections, itself included (ties go round). One association stays with one process
from start to end. Every process stores durably and records in the shared database before it
answers Success, exactly as the daemon's own receiver does.

A child has its own database engine and spool object, and the daemon's logging and audit
settings. It reports each ended connection (for the balance) and each released association
(so an early close is as prompt as for the daemon's own associations) through a pipe.
Children stop with the daemon (SIGTERM, then a bounded wait) and by themselves when the daemon
is gone. A child that died gets no more connections. Each child reports its receiver counters
(instances, bytes, refusals) about once a second, and the daemon adds them to its own, so its
``/metrics`` covers every receiver process.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomai import metrics
from dicomai.acceptor import send_connection
from dicomai.config import Settings
from dicomai.logs import log_fields

__all__ = ["ReceiverPool"]

logger = logging.getLogger(__name__)

_START_TIMEOUT = 60.0
_RELEASED = b"released"
_ENDED = b"ended"
_TOTALS = b"totals "
#: How often a child reports its counters (when they changed).
_TOTALS_EVERY = 1.0


class ReceiverPool:
    """``count`` child processes serving connections the daemon's receiver hands them."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        #: Called (on a pool thread) when a child's association released its studies.
        self.on_release: Callable[[], None] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._channels: list[socket.socket] = []
        self._readers: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        #: Open connections per process; index 0 is the daemon's own receiver.
        self._open = [0] * (count + 1)
        self._alive = [True] * (count + 1)
        self._next = 0
        #: Connections passed to each child so far (index 0: kept by the daemon).
        self.handed = [0] * (count + 1)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    def start(self) -> None:
        """Start the children and wait until each is ready; raises ``RuntimeError`` if one
        is not (the started ones are stopped)."""
        payload = pickle.dumps(self.settings)
        for i in range(self.count):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            # A fresh interpreter (python -m), not a fork of this threaded process.
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dicomai.receiver_pool", str(theirs.fileno()),
                     str(os.getpid())],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(),
                    pass_fds=[theirs.fileno()])
            finally:
                theirs.close()
            self._procs.append(proc)
            self._channels.append(ours)
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
            reader = threading.Thread(target=self._read, args=(i + 1, proc),
                                      name=f"receiver-pool-{i + 1}", daemon=True)
            reader.start()
            self._readers.append(reader)
        logger.info("receiver processes started", extra=log_fields(
            "receiver.pool_started", processes=self.count + 1))

    # -- balance ---------------------------------------------------------------------------
    def dispatch(self, conn: socket.socket, address: tuple[Any, ...]) -> bool:
        """The daemon's receiver calls this with each accepted connection: True when a child
        took it, False when the daemon serves it (then :meth:`local_done` follows)."""
        n = self.count + 1
        with self._lock:
            if self._stopping.is_set():
                target = 0
            else:
                target = min((i for i in range(n) if self._alive[i]),
                             key=lambda i: (self._open[i], (i - self._next) % n))
                self._next = (target + 1) % n
            self._open[target] += 1
            self.handed[target] += 1
        if target == 0:
            return False
        try:
            send_connection(self._channels[target - 1], conn, address)
        except OSError:
            logger.error("receiver process unreachable; its connections go elsewhere",
                         extra=log_fields("receiver.pool_child_lost", process=target))
            with self._lock:
                self._alive[target] = False
                self._open[target] -= 1
                self.handed[target] -= 1
                self._open[0] += 1
                self.handed[0] += 1
            return False
        return True

    def local_done(self) -> None:
        """A connection the daemon's own receiver served has ended."""
        self._ended(0)

    def _ended(self, index: int) -> None:
        with self._lock:
            self._open[index] = max(0, self._open[index] - 1)

    def open_connections(self) -> list[int]:
        """Open connections per process (index 0: the daemon's own receiver)."""
        with self._lock:
            return list(self._open)

    def _read(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        totals: dict[str, Any] | None = None
        for line in proc.stdout:
            word = line.strip()
            if word == _ENDED:
                self._ended(index)
            elif word.startswith(_TOTALS):
                try:
                    new = json.loads(word[len(_TOTALS):])
                except ValueError:
                    continue
                metrics.add_receiver_counts(metrics.receiver_delta(new, totals))
                totals = new
            elif word == _RELEASED and self.on_release is not None:
                try:
                    self.on_release()
                except Exception:
                    logger.exception("release callback failed", extra=log_fields(
                        "association.release_mark_failed"))
        with self._lock:
            self._alive[index] = False
        if not self._stopping.is_set():
            logger.error("receiver process ended", extra=log_fields(
                "receiver.pool_child_ended", pid=proc.pid, code=proc.wait()))

    def stop(self, timeout: float = 10.0) -> None:
        """No more hand-offs; SIGTERM every child (each stops its receiver, bounded), then
        wait; kill stragglers."""
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
        for channel in self._channels:
            channel.close()
        self._procs, self._readers, self._channels = [], [], []


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
    """A receiver process: ``python -m dicomai.receiver_pool CHANNEL_FD DAEMON_PID``, the
    pickled settings on stdin; serves the connections passed over the Unix socket
    ``CHANNEL_FD``; prints ``ready``, then ``ended`` per connection and ``released`` per
    released association; runs until SIGTERM or until the daemon is gone."""
    args = sys.argv[1:] if argv is None else argv
    channel_fd, parent_pid = int(args[0]), int(args[1])
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

    # Counter totals as the daemon last saw them (it starts from zero too).
    reported: dict[str, Any] = {"instances": 0.0, "bytes": 0.0, "refused": {}}

    def report() -> None:
        nonlocal reported
        now = metrics.receiver_totals()
        if now != reported:
            send(_TOTALS + json.dumps(now).encode())
            reported = now

    spool = Spool(settings.spool_path)
    receiver = Receiver(settings.receiver, spool, Queue(make_session_factory(engine)), utcnow,
                        handoff_channel=socket.socket(fileno=channel_fd))
    try:
        receiver.start()
        receiver.on_release = lambda: send(_RELEASED)
        receiver.set_connection_hooks(done=lambda: send(_ENDED), on_eof=stop.set)
        send(b"ready")
        while not stop.wait(_TOTALS_EVERY):
            report()
            if os.getppid() != parent_pid:
                break
    finally:
        receiver.stop()
        report()  # what came in while stopping
        spool.close()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
