"""Shared fixtures: where the real assets in ../shared live."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, running_postgres

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def assets() -> Path:
    """The shared real-asset folder (``$FEDFER_ASSETS``, else ``../shared`` beside the checkout)."""
    path = Path(os.environ.get("FEDFER_ASSETS", REPO.parent / "shared")).resolve()
    if not (path / "models").is_dir():
        pytest.fail(f"real assets not found at {path}; set FEDFER_ASSETS")
    return path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback, started on first use once per session (fails if not installed).

    ``postgres_server.new_database()`` returns the URL of a fresh, empty database.
    """
    try:
        manager = running_postgres()
        server = manager.__enter__()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        manager.__exit__(None, None, None)
