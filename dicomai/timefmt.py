"""Datetimes as the database returns them, made aware, and as operators read them (ISO 8601).

SQLite hands back naive datetimes (all stored as UTC); PostgreSQL aware ones. Everything shown
or compared works on aware UTC values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

__all__ = ["aware", "iso"]


@overload
def aware(value: datetime) -> datetime: ...
@overload
def aware(value: None) -> None: ...
def aware(value: datetime | None) -> datetime | None:
    """``value`` with UTC as its zone when it has none; None stays None."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def iso(value: datetime | None) -> str | None:
    """ISO 8601 to the second (UTC when naive), or None."""
    if value is None:
        return None
    return aware(value).isoformat(timespec="seconds")
