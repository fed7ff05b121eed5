"""What the attacks are judged by: the daemon's process tree (resident memory and threads, from
/proc, summed over the daemon and every descendant) and whether it answers C-ECHO, measured
in background threads while an attack is held."""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dicomai.ops.scu import echo

__all__ = ["EchoProbe", "TreeSampler", "Usage", "tree_usage"]

_FIELD = re.compile(r"^(VmRSS|Threads):\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Usage:
    """Resident memory (MiB) and threads of a process tree."""

    rss_mb: float
    threads: int
    processes: int


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process now (from /proc/<pid>/stat)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def tree_usage(pid: int) -> Usage:
    """RSS and threads of ``pid`` and all its descendants, now."""
    children = _children()
    todo, rss_kb, threads, processes = [pid], 0, 0, 0
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            values = dict(_FIELD.findall(Path(f"/proc/{p}/status").read_text()))
        except OSError:
            continue
        rss_kb += int(values.get("VmRSS", 0))
        threads += int(values.get("Threads", 0))
        processes += 1
    return Usage(rss_kb / 1024, threads, processes)


class _Loop:
    """A daemon thread that calls ``step`` until stopped."""

    interval = 0.1

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=type(self).__name__)

    def step(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@dataclass
class TreeSampler(_Loop):
    """Samples :func:`tree_usage` of ``pid`` every 0.1 s; keeps the peaks."""

    pid: int
    peak_rss_mb: float = 0.0
    peak_threads: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    def step(self) -> None:
        usage = tree_usage(self.pid)
        self.peak_rss_mb = max(self.peak_rss_mb, usage.rss_mb)
        self.peak_threads = max(self.peak_threads, usage.threads)
        self.samples += 1


@dataclass
class EchoProbe(_Loop):
    """C-ECHO the daemon every 0.5 s, each with a ``within``-second limit on its association
    and its response; records (status or None, seconds) per try."""

    port: int
    within: float = 5.0
    results: list[tuple[int | None, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()
        self.interval = 0.5

    def step(self) -> None:
        started = time.monotonic()
        try:
            status = echo("127.0.0.1", self.port, called_ae="DICOMAI", timeout=self.within)
        except Exception:  # a refused or broken association is a failed try
            status = None
        self.results.append((status, round(time.monotonic() - started, 2)))

    def failures(self) -> list[tuple[int | None, float]]:
        """The tries that did not get Success within the limit."""
        return [(s, t) for s, t in self.results if s != 0 or t >= self.within]
