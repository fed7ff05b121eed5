"""One durable flush per small received instance: its bytes committed with its row.

Storing an instance durably took two flushes before Success: the file's ``fdatasync`` and
the database commit. For an instance of at most :data:`MAX_COPY_BYTES` the receiver now
writes the file without flushing it and commits the same bytes with the instance's row
(:class:`~dicomai.db.InstanceCopy`, in the same transaction): the commit alone makes the
instance durable, and Success follows it. The file is complete at once for every reader in
this operating system (the worker reads it from the page cache); what is deferred is only
its flush to disk.

:class:`CopyFlusher` (one per receiver) then ``fdatasync``\\s the files in batches on its own
thread and deletes their copies, one transaction per batch. After a crash of the machine, a
file may have lost what was not flushed; :func:`restore_copies` writes the files of the copies
left again from their bytes, fsyncs them and deletes the copies. The daemon runs it at start
before receiving or working, and the scheduler every minute for copies older than a minute
(those of a receiver process that died).

Larger instances (a CT slice is about 0.5 MB) keep the file flush: copying them into the
database would cost more than the flush saves.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from dicomai.ingest.index import InstanceIndex
from dicomai.ingest.slots import write_all
from dicomai.ingest.spool import _fsync_dir  # the spool's own directory fsync
from dicomai.logs import log_fields

__all__ = ["MAX_COPY_BYTES", "CopyFlusher", "restore_copies"]

logger = logging.getLogger(__name__)

#: Instances of at most this many bytes (file meta included) are committed with their row.
MAX_COPY_BYTES = 64 * 1024

_fdatasync = getattr(os, "fdatasync", os.fsync)


def _flush(path: str) -> bool:
    """``fdatasync`` an existing file; False when it cannot be (its copy is kept)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        _fdatasync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _rewrite(path: str, data: bytes) -> None:
    """Write ``data`` over the file at ``path`` (made if missing) and fsync it. Never shorter
    than ``data`` at any moment: a reader of the same bytes sees no change."""
    created = not os.path.exists(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, [data])
        if os.fstat(fd).st_size > len(data):
            os.ftruncate(fd, len(data))
        _fdatasync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(Path(path).parent)


def restore_copies(index: InstanceIndex, made_before: datetime | None = None) -> int:
    """Write the files of the instance copies left (committed before ``made_before``, if
    given) again from their bytes, fsync them and delete the copies; returns how many."""
    restored = 0
    while True:
        batch = index.instance_copies(made_before)
        if not batch:
            break
        done = []
        for path, data in batch:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                _rewrite(path, data)
                done.append(path)
            except OSError:
                logger.exception(
                    "could not restore an instance file",
                    extra=log_fields("instance.restore_failed"),
                )
        if not done:
            break
        index.drop_instance_copies(done)
        restored += len(done)
    if restored:
        logger.warning(
            "instance files restored from their committed copies",
            extra=log_fields("instance.files_restored", files=restored),
        )
    return restored


class CopyFlusher:
    """Flushes the files of committed copies in batches and deletes the copies."""

    def __init__(self, index: InstanceIndex, batch: int = 128, max_wait: float = 0.2) -> None:
        self.index = index
        self.batch = batch
        self.max_wait = max_wait
        self._cond = threading.Condition()
        self._pending: list[str] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: Files flushed and copies deleted so far.
        self.flushed = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="copy-flusher", daemon=True)
        self._thread.start()

    def add(self, path: str) -> None:
        """A file whose copy was committed: flush it soon, then delete the copy."""
        with self._cond:
            self._pending.append(path)
            # the first item wakes the thread; a full batch ends its wait for more
            if len(self._pending) in (1, self.batch):
                self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Flush what is pending, then stop (what is left is restored at the next start)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _take(self) -> list[str]:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._stopping:  # let a batch gather (bounded), then take all of it
                deadline = time.monotonic() + self.max_wait
                while len(self._pending) < self.batch and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            batch, self._pending = self._pending, []
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch:
                self._flush_batch(batch)
            with self._cond:
                if self._stopping and not self._pending:
                    return

    def _flush_batch(self, paths: Sequence[str]) -> None:
        flushed = [p for p in paths if _flush(p)]
        try:
            if flushed:
                self.index.drop_instance_copies(flushed)
                self.flushed += len(flushed)
        except Exception:  # the copies stay; restore_copies handles them later
            logger.exception(
                "could not delete instance copies",
                extra=log_fields("instance.copies_drop_failed", files=len(flushed)),
            )
        if len(flushed) < len(paths):
            logger.warning(
                "instance files not flushed; their copies stay",
                extra=log_fields("instance.flush_failed", files=len(paths) - len(flushed)),
            )
