"""The clock the pipeline reads: wall time for the database, monotonic time for deadlines.

The daemon runs on :class:`SystemClock`; tests hand the worker, the sender and the scheduler a
:class:`ManualClock` and move it forward themselves, so backoffs, quiet periods and stale
heartbeats are checked to the second without waiting for them.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """What the pipeline asks of time."""

    def now(self) -> datetime:
        """The current time, aware, in UTC (stored in the database)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for deadlines and intervals)."""
        ...


class SystemClock:
    """The machine's clocks."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that stands still until a test moves it (thread-safe)."""

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2024, 1, 1, tzinfo=UTC)
        if start.tzinfo is None:
            raise ValueError("a ManualClock starts at an aware datetime")
        self._now = start.astimezone(UTC)
        self._monotonic = 0.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def advance(self, by: float | timedelta) -> datetime:
        """Move both clocks forward by ``by`` (seconds or a timedelta); the new time."""
        step = by if isinstance(by, timedelta) else timedelta(seconds=by)
        if step < timedelta(0):
            raise ValueError("a clock does not go back")
        with self._lock:
            self._now += step
            self._monotonic += step.total_seconds()
            return self._now

    def set(self, when: datetime) -> None:
        """Move the wall clock to ``when`` (not earlier than now)."""
        self.advance(when - self.now())
