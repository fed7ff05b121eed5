"""Give memory the process freed back to the operating system (glibc's ``malloc_trim``).

Decoding images and running models allocate and free hundreds of MB per study from several
threads. glibc keeps freed chunks in its arenas, and with many threads they fragment: under
``bench/memory.py`` the memory in use stays flat while the free memory glibc holds grows, and
with it the resident size. ``malloc_trim(0)`` returns the free pages of every arena. The
worker calls :class:`HeapTrimmer` after its jobs, at most every :data:`MIN_INTERVAL` seconds,
and once more when it goes idle.

Trimming returns whole free pages only; what is left is free chunks scattered among used ones
in each thread's arena. ``dicomai serve`` therefore also limits glibc to :data:`ARENAS`
arenas (:func:`limit_arenas`, unless ``MALLOC_ARENA_MAX`` is set), which keeps the resident
size flat over long runs at a small cost in time. The measurements are in the README
("Memory") and ``bench/results/memory-*.json``.

Elsewhere than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from dicomai.logs import log_fields

__all__ = ["ARENAS", "MIN_INTERVAL", "HeapTrimmer", "limit_arenas", "trim"]

logger = logging.getLogger(__name__)

#: glibc malloc arenas ``dicomai serve`` allows (glibc's default: 8 per core).
ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)

#: Fewest seconds between two trims of one :class:`HeapTrimmer` while jobs keep coming.
MIN_INTERVAL = 5.0


def _libc_function(name: str, *argtypes: Any) -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM: Callable[[int], int] | None = _libc_function("malloc_trim", ctypes.c_size_t)
_MALLOPT: Callable[[int, int], int] | None = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)


def limit_arenas(arenas: int = ARENAS, environ: Mapping[str, str] = os.environ) -> bool:
    """Limit glibc to ``arenas`` malloc arenas (call before threads start); True when set.

    Left alone when ``MALLOC_ARENA_MAX`` is in the environment (glibc read it at start)."""
    if _MALLOPT is None or "MALLOC_ARENA_MAX" in environ:
        return False
    return bool(_MALLOPT(_M_ARENA_MAX, arenas))


def trim() -> bool:
    """Return free heap pages to the system; True when some were (False: none, or no glibc)."""
    if _MALLOC_TRIM is None:
        return False
    return bool(_MALLOC_TRIM(0))


class HeapTrimmer:
    """Rate-limited :func:`trim` for a loop: :meth:`after_work` after each unit of work,
    :meth:`on_idle` when there is none (trims once per idle spell)."""

    def __init__(
        self,
        min_interval: float = MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        trim_fn: Callable[[], bool] = trim,
    ) -> None:
        self.min_interval = min_interval
        self._clock = clock
        self._trim = trim_fn
        self._lock = threading.Lock()
        self._last = clock()
        self._dirty = False
        #: Trims done so far.
        self.trims = 0

    def after_work(self) -> bool:
        """Trim if the last trim is at least ``min_interval`` old; True when it trimmed."""
        with self._lock:
            self._dirty = True
            if self._clock() - self._last < self.min_interval:
                return False
            return self._run()

    def on_idle(self) -> bool:
        """Trim once after work stopped (not again until :meth:`after_work` is called)."""
        with self._lock:
            return self._run() if self._dirty else False

    def _run(self) -> bool:
        started = time.perf_counter()
        released = self._trim()
        self._last = self._clock()
        self._dirty = False
        self.trims += 1
        logger.debug(
            "heap trimmed",
            extra=log_fields(
                "heap.trimmed",
                released=released,
                ms=round(1000 * (time.perf_counter() - started), 2),
            ),
        )
        return True
