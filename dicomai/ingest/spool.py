"""Spool: durable files for received instances (see :mod:`dicomai.ingest.slots`) and atomic files
for built results and quarantined objects. No database."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from dicomai.ingest.slots import EMPTY_SLOT_SWEEP_AGE, SlotPool, reap_dead_pools

__all__ = ["Spool", "safe_uid"]

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_uid(uid: str) -> str:
    """``uid`` if it is a well-formed DICOM UID usable as a file name, else ``ValueError``."""
    uid = str(uid).strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not _UID_RE.match(uid):
        raise ValueError("not a valid DICOM UID")
    return uid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The directory tree under ``root``: ``incoming/``, ``results/`` and ``quarantine/``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._made: set[Path] = set()
        self._slots = SlotPool(self.root / "incoming", self._make_dirs, _fsync_dir)

    def start(self) -> int:
        """Create the directory tree and remove temporary files left by a crash.

        Only ``.tmp`` files older than an hour are removed, since another process sharing the
        spool may be writing one right now. Returns the number removed.
        """
        for sub in ("incoming", "results", "quarantine"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - 3600
        removed = 0
        for tmp in self.root.rglob(".*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def write_instance(
        self, chunks: Sequence[bytes | memoryview], *, sync: bool = True
    ) -> tuple[Path, int]:
        """Write a received instance durably (data and size fsynced, in a file whose directory
        entry was made durable beforehand; with ``sync=False`` the caller makes the bytes
        durable otherwise: see :mod:`dicomai.ingest.copies`); returns ``(path, size)``. The caller
        indexes the path, or gives it back with :meth:`discard_instance`.

        Raises
        ------
        OSError
            Disk full or another I/O error; nothing is left to index.
        """
        return self._slots.write(chunks, sync=sync)

    def prepare(self) -> None:
        """Pre-create the first spool files for received instances (before receiving)."""
        self._slots.prepare()

    def discard_instance(self, path: Path) -> None:
        """Remove a written instance file that will not be indexed."""
        self._slots.discard(path)

    def close(self) -> None:
        """Give back the unused pre-created files (at shutdown)."""
        self._slots.close()

    def result_path(self, job_id: int, name: str) -> Path:
        """Where a built result lives: ``results/<job_id>/<name>``."""
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise ValueError('Argument "name" must be a plain file name.')
        return self.root / "results" / str(int(job_id)) / name

    def quarantine_path(self, reason: str) -> Path:
        """A fresh file name under ``quarantine/<reason>/`` (our own id, no dataset values)."""
        if not re.fullmatch(r"[a-z0-9_][a-z0-9_.-]*", reason):
            raise ValueError('Argument "reason" must be a short code.')
        return self.root / "quarantine" / reason / f"{uuid.uuid4().hex}.dcm"

    def write_atomic(
        self, path: Path, chunks: bytes | memoryview | Sequence[bytes | memoryview]
    ) -> int:
        """Write ``chunks`` to ``path`` via a fsynced temporary file and ``os.replace``.

        Returns
        -------
        int
            Bytes written.

        Raises
        ------
        OSError
            Disk full or another I/O error; no partial file is left at ``path``.
        """
        parent = path.parent
        if parent not in self._made:
            self._make_dirs(parent)
        tmp = parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        data = [chunks] if isinstance(chunks, bytes | bytearray | memoryview) else chunks
        size = 0
        try:
            try:
                fh = open(tmp, "wb")
            except FileNotFoundError:  # the directory was purged since we made it
                self._made.discard(parent)
                self._make_dirs(parent)
                fh = open(tmp, "wb")
            with fh:
                for chunk in data:
                    fh.write(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_dir(parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` and missing parents, each made durable in its parent (a file
        fsynced into a directory whose own entry was never fsynced could vanish in a crash)."""
        missing = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # another thread made it; its entry may not be durable yet
                pass
            _fsync_dir(d.parent)
        self._made.add(directory)

    def reap_dead_writers(self, indexed: Callable[[list[str]], set[str]]) -> int:
        """Remove unindexed received files of writers (receiver processes) that are gone;
        see :func:`dicomai.ingest.slots.reap_dead_pools`."""
        return reap_dead_pools(self.root / "incoming", indexed)

    def incoming_files(
        self, older_than_seconds: float, empty_older_than_seconds: float = EMPTY_SLOT_SWEEP_AGE
    ) -> list[Path]:
        """Received files last modified more than ``older_than_seconds`` ago; empty ones
        (pre-created slots, see :mod:`dicomai.ingest.slots`) only after
        ``empty_older_than_seconds``.
        """
        now = time.time()
        cutoff, empty_cutoff = now - older_than_seconds, now - empty_older_than_seconds
        out = []
        for path in (self.root / "incoming").rglob("*.dcm"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_mtime < (cutoff if st.st_size else empty_cutoff):
                out.append(path)
        return out

    def free_bytes(self) -> int:
        """Free space on the spool's file system."""
        return shutil.disk_usage(self.root).free

    def remove_tree(self, path: Path) -> None:
        """Delete a spool sub-tree (retention)."""
        if self.root not in path.parents:
            raise ValueError('Argument "path" must be inside the spool.')
        shutil.rmtree(path, ignore_errors=True)
        self._made = {d for d in self._made if d != path and path not in d.parents}
