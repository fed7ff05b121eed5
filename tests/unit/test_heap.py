"""dicomai.heap: freed heap memory goes back to the system, at a bounded rate."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from dicomai import heap
from dicomai.heap import HeapTrimmer


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
