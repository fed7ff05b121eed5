"""Waiting in tests: the one way to wait for something another thread or process does.

* :func:`wait_until` polls a condition until it holds, and on timeout fails with what it
  waited for and the last value it saw (a bare "timed out" says nothing in a CI log).
* :func:`sample_until` is the same loop for callers that judge the outcome themselves: it
  returns the last sample whether or not the condition came (a report, or an assertion
  with its own message).
* :func:`let_time_pass` is for time that must pass on purpose: a quiet period in which
  nothing may happen, a slow peer, pacing. Its ``why`` says what the time is for, so that
  no sleep in the suite is left unexplained.
* :func:`wait_for_study` waits for a study of an in-process daemon to reach a state.

Every wait names its timeout: CI runs on two slow cores, so timeouts are generous and a
test that waits for a condition is never slower than the condition itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from dicomai.ops.status import collect

__all__ = ["let_time_pass", "sample_until", "study_entry", "wait_for_study", "wait_until"]

T = TypeVar("T")

#: How much of the last value a timeout message shows.
_SHOWN_CHARS = 500


def sample_until(
    sample: Callable[[], T],
    done: Callable[[T], object],
    *,
    timeout: float,
    interval: float = 0.2,
) -> T:
    """Call ``sample`` every ``interval`` seconds until ``done(value)`` is truthy or
    ``timeout`` seconds have passed; the last value either way (the caller judges it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = sample()
        left = deadline - time.monotonic()
        if done(value) or left <= 0:
            return value
        time.sleep(min(interval, left))


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` every ``interval`` seconds until it returns something truthy, and
    return that. After ``timeout`` seconds fail with ``what`` was awaited, the last value
    seen and, when given, ``diagnose()`` (e.g. the end of a server's log).

    An exception from ``predicate`` (an assertion that a study must not have failed, a
    process that must still run) ends the wait at once.
    """
    value = sample_until(predicate, bool, timeout=timeout, interval=interval)
    if value is None or not value:
        shown = repr(value)
        if len(shown) > _SHOWN_CHARS:
            shown = shown[:_SHOWN_CHARS] + "..."
        message = f"timed out after {timeout:g} s waiting for {what} (last value: {shown})"
        if diagnose is not None:
            message += f"\n{diagnose()}"
        raise AssertionError(message)
    return value


def let_time_pass(seconds: float, why: str) -> None:
    """Let ``seconds`` pass on purpose (``why`` says what for): a period in which something
    must not happen, a peer that is slow on purpose, pacing. Not for waiting until something
    happens: that is :func:`wait_until`."""
    assert why, "say why the time must pass"
    time.sleep(seconds)


# -- the studies of an in-process daemon (tests.conftest.running_daemon) -----------------------
def study_entry(daemon: Any, study_uid: str) -> dict[str, Any] | None:
    """The study's entry in ``dicomai status`` (its latest generation), or None."""
    for s in collect(daemon.settings, limit=500, engine=daemon.engine)["studies"]:
        if s["study_instance_uid"] == study_uid:
            return s
    return None


def wait_for_study(
    daemon: Any, study_uid: str, *states: str, timeout: float = 120.0
) -> dict[str, Any]:
    """Wait until the study is in one of ``states``; its status entry. Fails at once when it
    ends failed or cancelled instead."""

    def check() -> dict[str, Any] | None:
        s = study_entry(daemon, study_uid)
        if s and s["state"] in ("failed", "cancelled") and s["state"] not in states:
            raise AssertionError(f"study ended {s['state']}: {s['last_error']}")
        return s if s and s["state"] in states else None

    return wait_until(check, timeout=timeout, what=f"study {'/'.join(states)}")
