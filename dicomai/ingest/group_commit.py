"""How concurrent receivers share the database's write: a group commit inside one process and
a file lock between processes.

Both serve :class:`~dicomai.ingest.index.InstanceIndex`: many associations each record one
instance at a time, and a commit (one WAL fsync on SQLite) per instance would be their limit.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dicomai.logs import log_fields

__all__ = ["FileLock", "GroupCommit", "Pending"]

logger = logging.getLogger(__name__)
R = TypeVar("R")


class FileLock:
    """An exclusive ``flock`` on a lock file beside the SQLite database, held while recording.

    Processes that would otherwise meet in SQLite's busy handler (which sleeps and retries)
    wait in the kernel and continue as soon as the lock is released. Threads of one process
    (the group commit's leader, the copy flusher of :mod:`dicomai.ingest.copies`) take a thread
    lock first: ``flock`` does not exclude them from each other. Without a usable lock file only
    the thread lock is taken.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._failed = False
        self._threads = threading.Lock()

    def __enter__(self) -> None:
        self._threads.acquire()
        if self._fd is None and not self._failed:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                self._failed = True
                logger.warning(
                    "no record lock file; SQLite's busy handler only",
                    extra=log_fields("queue.record_lock_unavailable"),
                )
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._threads.release()
                raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


@dataclass(slots=True)
class Pending(Generic[R]):
    """One call waiting for its (group) commit: its arguments, then its result or error."""

    args: tuple[Any, ...]
    result: R | None = None
    error: Exception | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def outcome(self) -> R:
        """The result, or the error raised."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class GroupCommit(Generic[R]):
    """Leader/follower group commit without a thread of its own.

    A caller that finds no leader becomes one: it takes every pending call (its own among
    them), runs them as one batch, then hands leadership on. Callers arriving meanwhile wait;
    the next leader takes all of them at once, so concurrent associations share a transaction
    and its commit (one WAL fsync instead of one each, no SQLite busy-wait between them).

    ``run`` must set every item's result (never ``None``) or error.
    """

    def __init__(self, run: Callable[[list[Pending[R]]], None]) -> None:
        self._run = run
        self._cond = threading.Condition()
        self._pending: list[Pending[R]] = []
        self._leading = False

    def submit(self, item: Pending[R]) -> None:
        """Return once ``item`` is done (its result or error set)."""
        with self._cond:
            self._pending.append(item)
            while self._leading and not item.done:
                self._cond.wait()
            if item.done:
                return
            self._leading = True
            batch, self._pending = self._pending, []
        try:
            self._run(batch)
        finally:
            with self._cond:
                for pending in batch:  # only after an interrupt: nobody waits forever
                    if not pending.done:
                        pending.error = RuntimeError("group commit interrupted")
                self._leading = False
                self._cond.notify_all()
