"""PostgreSQL fixtures: a fresh database per test on the server at 127.0.0.1:5432."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

PG_ADMIN = os.environ.get("DICOMAI_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres "
                                                   "dbname=postgres connect_timeout=3")
PG_URL = os.environ.get("DICOMAI_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/")


def _admin():  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(PG_ADMIN, autocommit=True)


def pg_available() -> bool:
    try:
        with _admin() as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a new, empty database, dropped after the test."""
    if not pg_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    name = f"dicomai_test_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL + name
    finally:
        with _admin() as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
