"""Shared fixtures: where the real assets in ../shared live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def assets() -> Path:
    """The shared real-asset folder (``$FEDFER_ASSETS``, else ``../shared`` beside the checkout)."""
    path = Path(os.environ.get("FEDFER_ASSETS", REPO.parent / "shared")).resolve()
    if not (path / "models").is_dir():
        pytest.fail(f"real assets not found at {path}; set FEDFER_ASSETS")
    return path
