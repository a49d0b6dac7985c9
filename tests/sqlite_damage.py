"""Test support: damage an SQLite file the way a failing disk or a careless copy would."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path


def zero_btree_page(path: Path, table: str) -> None:
    """Zero the root page of ``table``'s b-tree (found through sqlite_master); drop any -wal/-shm."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        root = int(conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0])
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with path.open("r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(bytes(page_size))
