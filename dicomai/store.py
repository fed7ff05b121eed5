"""Spool: durable, atomic files for received instances and built results. No database."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

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

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where a received instance lives: ``incoming/<study>/<series>/<sop>.dcm``."""
        return (
            self.root / "incoming" / safe_uid(study_uid) / safe_uid(series_uid)
            / f"{safe_uid(sop_uid)}.dcm"
        )

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

    def write_atomic(self, path: Path,
                     chunks: bytes | memoryview | Sequence[bytes | memoryview]) -> int:
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

    def incoming_files(self, older_than_seconds: float) -> list[Path]:
        """Received files last modified more than ``older_than_seconds`` ago."""
        cutoff = time.time() - older_than_seconds
        out = []
        for path in (self.root / "incoming").rglob("*.dcm"):
            try:
                if path.stat().st_mtime < cutoff:
                    out.append(path)
            except FileNotFoundError:
                continue
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
