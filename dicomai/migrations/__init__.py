"""Alembic migrations of dicomai's schema (SQLite and PostgreSQL alike), run programmatically."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from dicomai.logs import log_fields

__all__ = ["current_revision", "head_revision", "upgrade"]

logger = logging.getLogger(__name__)
_HERE = Path(__file__).resolve().parent
_MIGRATION_LOCK = 0x6469636F6D6D67  # advisory lock key held while migrating


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    return cfg


def head_revision() -> str:
    """The newest revision shipped with this version of dicomai."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None``: empty or pre-migration database)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Bring the schema to ``revision``; returns (before, after).

    A database created before migrations existed (tables but no ``alembic_version``) is
    stamped with the revision its tables match, then upgraded.
    """
    with _sqlite_file_lock(engine):
        return _upgrade(engine, revision)


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """On SQLite, an flock beside the database file serialises concurrent migrations."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    path = Path(database).with_name(Path(database).name + ".migrate.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _upgrade(engine: Engine, revision: str) -> tuple[str | None, str]:
    cfg = _config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Several processes may start at once: one migrates, the others wait, then
            # find the schema current.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        before = MigrationContext.configure(conn).get_current_revision()
        cfg.attributes["connection"] = conn
        if before is None and inspect(conn).has_table("jobs"):
            legacy = "0002" if inspect(conn).has_table("quarantine") else "0001"
            command.stamp(cfg, legacy)
            before = legacy
        command.upgrade(cfg, revision)
    after = current_revision(engine)
    if before != after:
        logger.info(
            "database schema upgraded", extra=log_fields("db.upgraded", before=before, after=after)
        )
    return before, after or ""
