"""dicomai.runtime.heap: freed heap memory goes back to the system, at a bounded rate."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from dicomai.runtime import heap
from dicomai.runtime.heap import HeapTrimmer


def _rss_kib() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._MALLOC_TRIM is None,
                    reason="glibc's malloc_trim")
def test_trim_returns_fragmented_free_memory() -> None:
    # 4 KiB blocks (malloc, not pymalloc), every 16th kept: the freed ones are holes inside
    # the heap that free() itself does not give back.
    blocks = [bytearray(4096) for _ in range(60_000)]
    kept = blocks[::16]
    del blocks
    before = _rss_kib()
    assert heap.trim() is True
    after = _rss_kib()
    assert before - after > 100 * 1024, (before, after)  # > 100 MiB of the ~230 MiB freed
    assert len(kept) == 3750


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_trims_at_most_every_interval_while_busy() -> None:
    clock, calls = _Clock(), []
    trimmer = HeapTrimmer(min_interval=5.0, clock=clock, trim_fn=lambda: calls.append(1) or True)
    assert trimmer.after_work() is False  # just created: the interval counts from then
    clock.now += 5.0
    assert trimmer.after_work() is True
    clock.now += 1.0
    assert trimmer.after_work() is False
    clock.now += 4.0
    assert trimmer.after_work() is True
    assert len(calls) == trimmer.trims == 2


def test_trims_once_per_idle_spell() -> None:
    clock, calls = _Clock(), []
    trimmer = HeapTrimmer(min_interval=5.0, clock=clock, trim_fn=lambda: calls.append(1) or True)
    assert trimmer.on_idle() is False  # nothing ran yet
    trimmer.after_work()  # too soon: not trimmed, but marked
    assert trimmer.on_idle() is True
    assert trimmer.on_idle() is False  # still idle: once is enough
    clock.now += 60
    assert trimmer.on_idle() is False
    trimmer.after_work()  # trims (interval passed)
    assert trimmer.on_idle() is False  # nothing since that trim
    assert len(calls) == 2


_ARENA_PROBE = """
import re, sys, threading
from pathlib import Path
from dicomai.runtime import heap
if sys.argv[1] == "limit":
    assert heap.limit_arenas(2)
def vm():
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmSize:\\s+(\\d+) kB", text, re.M).group(1))
before = vm()
go = threading.Barrier(8)
def work():
    go.wait()
    for _ in range(200):
        blocks = [bytearray(2000) for _ in range(50)]
        del blocks
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print((vm() - before) // 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._MALLOPT is None,
                    reason="glibc's mallopt")
def test_limit_arenas_keeps_threads_from_making_their_own(tmp_path: Path) -> None:
    """8 threads allocating at once: each gets a 64 MiB arena of its own unless limited."""
    import os
    import subprocess

    script = tmp_path / "probe.py"
    script.write_text(_ARENA_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def grown_mib(mode: str) -> int:
        out = subprocess.run([sys.executable, str(script), mode], env=env, check=True,
                             capture_output=True, text=True, cwd=Path(__file__).parents[2])
        return int(out.stdout.strip())

    free, limited = grown_mib("free"), grown_mib("limit")
    assert limited <= 2 * 64 + 32 < free, (free, limited)
    assert heap.limit_arenas(2, environ={"MALLOC_ARENA_MAX": "4"}) is False  # glibc's own
