"""Fixtures for aggregator tests: a storage URL per backend (PostgreSQL from ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.postgres import PostgresServer


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL naming an empty database, once per backend."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'fedfer.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()
