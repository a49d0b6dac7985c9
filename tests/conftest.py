"""Shared fixtures: where the real assets in ../shared live."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, running_postgres

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Options of the privacy audits (registered here so ``pytest tests --audit-report PATH`` works too)."""
    group = parser.getgroup("privacy audits (tests/privacy)")
    group.addoption(
        "--audit-report", default=None, metavar="PATH", help="write every privacy figure as one JSON object"
    )
    group.addoption("--audit-full", action="store_true", default=False, help="heavier privacy-audit variants")


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
