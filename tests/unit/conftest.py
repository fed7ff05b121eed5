"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from dicomai.db import create_all, make_engine
from tests.conftest import TEST_DATABASE


@pytest.fixture
def engine(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """SQLite, or a fresh PostgreSQL database with ``DICOMAI_TEST_DATABASE=postgres``."""
    url = (str(request.getfixturevalue("pg_url")) if TEST_DATABASE == "postgres"
           else f"sqlite:///{tmp_path / 'dicomai.db'}")
    eng = make_engine(url)
    create_all(eng)
    yield eng
    eng.dispose()
