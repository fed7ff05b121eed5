"""Alembic migrations of dicomai's schema (SQLite and PostgreSQL alike), run programmatically."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from dicomai.logs import log_fields

__all__ = ["current_revision", "head_revision", "upgrade"]

logger = logging.getLogger(__name__)
_HERE = Path(__file__).resolve().parent


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
    cfg = _config()
    before = current_revision(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        if before is None and inspect(conn).has_table("jobs"):
            legacy = "0002" if inspect(conn).has_table("quarantine") else "0001"
            command.stamp(cfg, legacy)
            before = legacy
        command.upgrade(cfg, revision)
    after = current_revision(engine)
    if before != after:
        logger.info("database schema upgraded", extra=log_fields(
            "db.upgraded", before=before, after=after))
    return before, after or ""
