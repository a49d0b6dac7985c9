"""Open a storage backend from a URL."""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse

from fedfer.aggregator.storage.base import Storage, StorageError

__all__ = ["open_storage", "redact_url"]


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe for logs and errors)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def open_storage(url: str, *, now: dt.datetime | None = None, timeout_s: float = 10.0) -> Storage:
    """Open (creating and migrating if needed) the storage a URL names.

    Args:
        url: ``sqlite:///absolute/path.db``, ``sqlite:relative/path.db`` or ``postgresql://...``. SQLite URLs
            accept ``?synchronous=normal`` to trade power-loss durability for write speed (see
            :class:`~fedfer.aggregator.storage.sqlite.SqliteStorage`).
        now: Time recorded with applied migrations; defaults to the current UTC time.
        timeout_s: SQLite busy timeout or PostgreSQL connect timeout, in seconds.

    Raises:
        StorageError: Unknown scheme, or the database cannot be opened.
    """
    if type(url) is not str:
        raise StorageError("storage URL must be a string")
    when = dt.datetime.now(dt.UTC) if now is None else now
    if url.startswith("sqlite:"):
        from fedfer.aggregator.storage.sqlite import SqliteStorage

        path, _, query = url.removeprefix("sqlite:").partition("?")
        path = path.removeprefix("//") if path.startswith("///") else path
        if not path or path.startswith("//") or path == ":memory:":
            raise StorageError("sqlite URL must name a file: sqlite:///absolute/path.db")
        try:
            options = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            options = {"": []}
        if set(options) - {"synchronous"} or any(len(v) != 1 for v in options.values()):
            raise StorageError("the only sqlite URL option is synchronous=full|normal")
        synchronous = options.get("synchronous", ["full"])[0]
        return SqliteStorage(path, busy_timeout_s=timeout_s, synchronous=synchronous, now=when)
    if url.startswith(("postgresql://", "postgres://")):
        from fedfer.aggregator.storage.postgres import PostgresStorage

        return PostgresStorage(url, connect_timeout_s=timeout_s, now=when)
    raise StorageError(f"unsupported storage URL scheme in {redact_url(url)!r}")
