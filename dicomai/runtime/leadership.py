"""Which scheduler is active: a PostgreSQL advisory lock, or a file lock on a single host."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import IO, Protocol

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from dicomai.logs import log_fields

__all__ = [
    "ADVISORY_LOCK_KEY",
    "FileLeadership",
    "Leadership",
    "PostgresLeadership",
    "leadership_for",
]

logger = logging.getLogger(__name__)

#: Advisory lock key of the active scheduler (any 64-bit number unique to dicomai).
ADVISORY_LOCK_KEY = 0x6469636F6D6169  # "dicomai"


class Leadership(Protocol):
    """Exclusive right to run the periodic jobs."""

    def acquire(self) -> bool:
        """True if this process holds (or just took) the leadership."""
        ...

    def release(self) -> None:
        """Give it up (idempotent)."""
        ...


class PostgresLeadership:
    """Session-level ``pg_try_advisory_lock`` on a connection held while active.

    If the process dies its connection closes and PostgreSQL frees the lock, so a standby
    scheduler takes over at its next tick.
    """

    def __init__(self, engine: Engine, key: int = ADVISORY_LOCK_KEY) -> None:
        self.engine = engine
        self.key = key
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute(text("SELECT 1"))
                    return True
                except Exception:  # connection lost: so is the lock
                    logger.warning(
                        "scheduler leadership lost", extra=log_fields("scheduler.leadership_lost")
                    )
                    self._drop()
            conn = self.engine.connect()
            try:
                got = bool(
                    conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
                )
                conn.commit()
            except Exception:
                conn.close()
                raise
            if not got:
                conn.close()
                return False
            self._conn = conn
            logger.info(
                "scheduler leadership taken",
                extra=log_fields("scheduler.leadership_taken", pid=os.getpid()),
            )
            return True

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
            finally:
                self._conn = None

    def release(self) -> None:
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                self._conn.commit()
                self._conn.close()
            except Exception:
                self._drop()
            self._conn = None


class FileLeadership:
    """``flock`` on a file: one active scheduler per host (SQLite installs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self._fh is not None:
                return True
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                return False
            self._fh = fh
            return True

    def release(self) -> None:
        with self._lock:
            if self._fh is not None:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
                self._fh.close()
                self._fh = None


def leadership_for(engine: Engine, data_dir: Path) -> Leadership:
    """Advisory lock on PostgreSQL, a file lock in ``data_dir`` otherwise."""
    if engine.dialect.name == "postgresql":
        return PostgresLeadership(engine)
    return FileLeadership(data_dir / "scheduler.lock")
