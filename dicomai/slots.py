"""Pre-created spool files ("slots") for received instances: one fsync per instance.

Writing a new file durably costs a file fsync *and* a directory fsync (the new entry must
survive a crash as well as the bytes); on the machines measured the directory fsync after a
rename costs as much as the file's own. A slot pool moves the directory part off the per-
instance path: it creates a batch of empty files, fsyncs their directory once, and hands them
out one by one. Storing an instance is then: write the bytes into a free slot, ``fdatasync``
(which makes the data and the new file size durable), commit the row that names the slot.

Rules that keep this safe alongside :func:`dicomai.scheduler.sweep_orphans`:

* each pool writes only into a directory it created itself (a random name), so receiver
  processes and hosts sharing the spool never hand out the same slot;
* a slot is never handed out more than :data:`SLOT_MAX_AGE` after its batch was created; the
  sweep removes *empty* files only when they are older than :data:`EMPTY_SLOT_SWEEP_AGE`,
  twice that, so it never removes a slot a live pool may still write;
* a slot that cannot be opened any more (removed by hand, purged) is skipped, never re-made
  without the directory fsync.

Layout: ``incoming/<YYYYMMDD>/<random>/<NNNNNN>.dcm``; the instance row holds the path.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["EMPTY_SLOT_SWEEP_AGE", "SLOT_MAX_AGE", "SlotPool"]

#: A pool hands out a slot at most this long (seconds) after creating it.
SLOT_MAX_AGE = 12 * 3600.0
#: The orphan sweep removes empty received files only when older than this (seconds).
EMPTY_SLOT_SWEEP_AGE = 2 * SLOT_MAX_AGE

_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


class SlotPool:
    """Empty, durably created files under ``incoming`` handed out for one write each.

    Thread-safe. ``make_dirs`` creates a directory durably (see :meth:`Spool._make_dirs`);
    ``fsync_dir`` makes a directory's entries durable.
    """

    def __init__(self, incoming: Path, make_dirs: Callable[[Path], None],
                 fsync_dir: Callable[[Path], None], *, batch: int = 64,
                 per_directory: int = 4096,
                 clock: Callable[[], float] = time.monotonic,
                 today: Callable[[], str] = lambda: time.strftime("%Y%m%d")) -> None:
        self.incoming = Path(incoming)
        self._make_dirs = make_dirs
        self._fsync_dir = fsync_dir
        self._batch = batch
        self._per_directory = per_directory
        self._clock = clock
        self._today = today
        self._lock = threading.Lock()
        self._free: deque[Path] = deque()
        self._created_at = 0.0
        self._directory: Path | None = None
        self._day = ""
        self._used_in_directory = 0

    def _next_directory(self) -> Path:
        day = self._today()
        if (self._directory is None or day != self._day
                or self._used_in_directory + self._batch > self._per_directory):
            self._day = day
            self._directory = self.incoming / day / uuid.uuid4().hex[:12]
            self._used_in_directory = 0
            self._make_dirs(self._directory)
        return self._directory

    def _refill(self) -> None:
        """Discard what is left and create a new batch (caller holds the lock)."""
        for stale in self._free:
            stale.unlink(missing_ok=True)
        self._free.clear()
        directory = self._next_directory()
        made: list[Path] = []
        try:
            for i in range(self._used_in_directory, self._used_in_directory + self._batch):
                path = directory / f"{i:06d}.dcm"
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o644))
                made.append(path)
            self._fsync_dir(directory)
        except BaseException:
            for path in made:
                path.unlink(missing_ok=True)
            self._directory = None  # start a fresh directory next time
            raise
        self._used_in_directory += self._batch
        self._free.extend(made)
        self._created_at = self._clock()

    def _take(self) -> Path:
        with self._lock:
            if not self._free or self._clock() - self._created_at > SLOT_MAX_AGE:
                self._refill()
            return self._free.popleft()

    def write(self, chunks: Sequence[bytes | memoryview]) -> tuple[Path, int]:
        """Write ``chunks`` into a free slot and ``fdatasync`` it; returns ``(path, size)``.

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
                with self._lock:
                    self._free.clear()
                    self._directory = None
                continue
            size = 0
            try:
                try:
                    for chunk in chunks:
                        view = memoryview(chunk).cast("B")
                        while view:
                            written = os.write(fd, view)
                            size += written
                            view = view[written:]
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

    def close(self) -> None:
        """Remove the free slots (at shutdown; the sweep removes them otherwise)."""
        with self._lock:
            for path in self._free:
                path.unlink(missing_ok=True)
            self._free.clear()
