"""Pre-created spool files ("slots") for received instances: one fsync per instance.

Writing a new file durably costs a file fsync *and* a directory fsync (the new entry must
survive a crash as well as the bytes); on the machines measured the directory fsync after a
rename costs as much as the file's own. A slot pool moves the directory part off the per-
instance path: it creates a batch of empty files, fsyncs their directory once, and hands them
out one by one. Storing an instance is then: write the bytes into a free slot, ``fdatasync``
(which makes the data and the new file size durable), commit the row that names the slot.

Rules that keep this safe alongside :func:`dicomai.runtime.scheduler.sweep_orphans`:

* each pool writes only into a directory it created itself (a random name), so receiver
  processes and hosts sharing the spool never hand out the same slot;
* a slot is never handed out more than :data:`SLOT_MAX_AGE` after its batch was created; the
  sweep removes *empty* files only when they are older than :data:`EMPTY_SLOT_SWEEP_AGE`,
  twice that, so it never removes a slot a live pool may still write;
* a slot that cannot be opened any more (removed by hand, purged) is skipped, never re-made
  without the directory fsync.

Layout: ``incoming/<YYYYMMDD>/<pool>-<n>/<NNNNNN>.dcm``; the instance row holds the path.
Each pool holds an exclusive ``flock`` on ``incoming/.pools/<pool>.lock`` while its process
lives. :func:`reap_dead_pools` (at start) takes the lock of a pool whose process is gone and
removes that pool's unindexed files at once: the instance in flight when a receiver was killed
(written, never acknowledged) and the unused empty slots. Where locks do not work (some network
file systems) the age rules above still clean up.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from dicomai.logs import log_fields

__all__ = ["EMPTY_SLOT_SWEEP_AGE", "SLOT_MAX_AGE", "SlotPool", "reap_dead_pools", "write_all"]

#: A pool hands out a slot at most this long (seconds) after creating it.
SLOT_MAX_AGE = 12 * 3600.0
#: The orphan sweep removes empty received files only when older than this (seconds).
EMPTY_SLOT_SWEEP_AGE = 2 * SLOT_MAX_AGE

logger = logging.getLogger(__name__)

_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def write_all(fd: int, chunks: Sequence[bytes | memoryview]) -> int:
    """Write every chunk, in order, with as few system calls as the kernel allows (one
    ``writev`` usually); returns the number of bytes written."""
    views = [memoryview(chunk).cast("B") for chunk in chunks]
    views = [view for view in views if view]
    size = 0
    while views:
        written = os.writev(fd, views)
        if written <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        size += written
        while views and written >= len(views[0]):  # drop what was written in full
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
    return size


class SlotPool:
    """Empty, durably created files under ``incoming`` handed out for one write each.

    Thread-safe. ``make_dirs`` creates a directory durably (see :meth:`Spool._make_dirs`);
    ``fsync_dir`` makes a directory's entries durable. With ``background`` (the default) the
    next batch is made on a helper thread once fewer than ``batch // 2`` slots are left, so a
    slow directory fsync (it waits for the file system's journal) rarely delays a C-STORE.
    """

    def __init__(
        self,
        incoming: Path,
        make_dirs: Callable[[Path], None],
        fsync_dir: Callable[[Path], None],
        *,
        batch: int = 64,
        per_directory: int = 4096,
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
        today: Callable[[], str] = lambda: time.strftime("%Y%m%d"),
    ) -> None:
        self.incoming = Path(incoming)
        self._make_dirs = make_dirs
        self._fsync_dir = fsync_dir
        self._batch = batch
        self._low = batch // 2 if background else 0
        self._per_directory = per_directory
        self._clock = clock
        self._today = today
        self._cond = threading.Condition()
        self._free: deque[tuple[Path, float]] = deque()  # (slot, made at)
        self._refilling = False
        self._closed = False
        self._directory: Path | None = None
        self._day = ""
        self._used_in_directory = 0
        self.pool_id = uuid.uuid4().hex[:12]
        self._directories = 0
        self._lock_fd: int | None = None

    def _own(self) -> None:
        """Take this pool's ownership lock (once, before its first directory)."""
        if self._lock_fd is not None:
            return
        pools = self.incoming / ".pools"
        self._make_dirs(pools)
        path = pools / f"{self.pool_id}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # no locks on this file system: the age rules clean up instead
            logger.info("spool file locks unavailable", extra=log_fields("spool.no_locks"))
        self._fsync_dir(pools)
        self._lock_fd = fd

    def _next_directory(self) -> Path:
        day = self._today()
        if (
            self._directory is None
            or day != self._day
            or self._used_in_directory + self._batch > self._per_directory
        ):
            self._own()
            self._day = day
            self._directories += 1
            self._directory = self.incoming / day / f"{self.pool_id}-{self._directories}"
            self._used_in_directory = 0
            self._make_dirs(self._directory)
        return self._directory

    def _make_batch(self) -> list[tuple[Path, float]]:
        """Create a batch of empty files and fsync their directory (one maker at a time: the
        caller set :attr:`_refilling`). A directory removed meanwhile (retention, an admin)
        is replaced by a new one."""
        for attempt in range(2):
            directory = self._next_directory()
            made: list[Path] = []
            try:
                for i in range(self._used_in_directory, self._used_in_directory + self._batch):
                    path = directory / f"{i:06d}.dcm"
                    os.close(
                        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                    )
                    made.append(path)
                self._fsync_dir(directory)
            except FileNotFoundError:
                for path in made:
                    path.unlink(missing_ok=True)
                self._directory = None  # a fresh directory
                if attempt:
                    raise
                continue
            except BaseException:
                for path in made:
                    path.unlink(missing_ok=True)
                self._directory = None  # start a fresh directory next time
                raise
            break
        self._used_in_directory += self._batch
        now = self._clock()
        return [(path, now) for path in made]

    def _add(self, batch: list[tuple[Path, float]] | None) -> None:
        """Hand a made batch (or the failure to make one: None) to the waiting takers."""
        with self._cond:
            self._refilling = False
            if batch and self._closed:
                for path, _ in batch:
                    path.unlink(missing_ok=True)
            elif batch:
                self._free.extend(batch)
            self._cond.notify_all()

    def _refill_background(self) -> None:
        batch = None
        try:
            batch = self._make_batch()
        except Exception:  # the taker that finds the pool empty tries again and reports it
            logger.warning(
                "could not pre-create spool files",
                exc_info=True,
                extra=log_fields("spool.slots_failed"),
            )
        finally:
            self._add(batch)

    def prepare(self) -> None:
        """Make the first batch now (at start, before associations are accepted)."""
        with self._cond:
            if self._free or self._refilling:
                return
            self._refilling = True
        batch = None
        try:
            batch = self._make_batch()
        finally:
            self._add(batch)

    def _take(self) -> Path:
        with self._cond:
            while True:
                if self._closed:
                    raise OSError("the spool is closed (shutting down)")
                now = self._clock()
                while self._free and now - self._free[0][1] > SLOT_MAX_AGE:
                    self._free.popleft()[0].unlink(missing_ok=True)
                if self._free:
                    path = self._free.popleft()[0]
                    if len(self._free) < self._low and not self._refilling:
                        self._refilling = True
                        threading.Thread(
                            target=self._refill_background, daemon=True, name="spool-slots"
                        ).start()
                    return path
                if not self._refilling:
                    self._refilling = True
                    break
                self._cond.wait()
        batch = None
        try:
            batch = self._make_batch()
        finally:
            self._add(batch)
        return self._take()

    def write(self, chunks: Sequence[bytes | memoryview], *, sync: bool = True) -> tuple[Path, int]:
        """Write ``chunks`` into a free slot and ``fdatasync`` it (unless ``sync`` is False:
        the caller makes the bytes durable otherwise); returns ``(path, size)``.

        Raises
        ------
        OSError
            Disk full or another I/O error; the slot is removed, nothing partial is left for
            the caller to index.
        """
        for _ in range(3):
            path = self._take()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # removed behind our back: never re-create it here
                self._forget_directory(path.parent)
                continue
            size = 0
            try:
                try:
                    size = write_all(fd, chunks)
                    if sync:
                        _fdatasync(fd)
                finally:
                    os.close(fd)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            return path, size
        raise FileNotFoundError("spool slots keep disappearing")

    def discard(self, path: Path) -> None:
        """Remove a written slot that will not be indexed (a duplicate instance)."""
        path.unlink(missing_ok=True)

    def _forget_directory(self, directory: Path) -> None:
        """Drop the free slots of a directory that was removed; the next batch goes into a
        new one."""
        with self._cond:
            self._free = deque(item for item in self._free if item[0].parent != directory)
            if self._directory == directory and not self._refilling:
                self._directory = None

    def close(self) -> None:
        """Remove the free slots (at shutdown; the sweep removes them otherwise) and give up
        the ownership lock: what this pool wrote is indexed or an orphan by now."""
        with self._cond:
            self._closed = True
            for path, _ in self._free:
                path.unlink(missing_ok=True)
            self._free.clear()
            fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            (self.incoming / ".pools" / f"{self.pool_id}.lock").unlink(missing_ok=True)
            os.close(fd)


def reap_dead_pools(incoming: Path, indexed: Callable[[list[str]], set[str]]) -> int:
    """Remove the unindexed files of slot pools whose process is gone (their lock is free);
    returns how many files were removed. ``indexed`` tells which paths have an instance row.

    Such a file was never acknowledged (the row is committed before Success), so the sender
    sends that instance again.
    """
    removed = 0
    for lock_path in sorted((Path(incoming) / ".pools").glob("*.lock")):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # reaped by another process meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its process lives (or locks do not work here)
                continue
            pool_id = lock_path.stem
            files = sorted(Path(incoming).glob(f"*/{pool_id}-*/*.dcm"))
            keep = indexed([str(p) for p in files])
            for path in files:
                if str(path) not in keep:
                    path.unlink(missing_ok=True)
                    removed += 1
            for directory in {p.parent for p in files}:
                try:
                    directory.rmdir()  # only when nothing indexed is left in it
                except OSError:
                    pass
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed
