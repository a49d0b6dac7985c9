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


def open_storage(
    url: str, *, now: dt.datetime | None = None, timeout_s: float = 10.0, create: bool = False
) -> Storage:
    """Open (and migrate if needed) the storage a URL names.

    An existing deployment's storage is never silently replaced: without ``create`` a database that does
    not exist, is empty, or holds no fedfer schema is refused (and left as found); only a new deployment
    (``fedfer-aggregator init``) passes ``create=True``.

    Args:
        url: ``sqlite:///absolute/path.db``, ``sqlite:relative/path.db`` or ``postgresql://...``. SQLite URLs
            accept ``?synchronous=normal`` to trade power-loss durability for write speed (see
            :class:`~fedfer.aggregator.storage.sqlite.SqliteStorage`).
        now: Time recorded with applied migrations; defaults to the current UTC time.
        timeout_s: SQLite busy timeout or PostgreSQL connect timeout, in seconds.
        create: Create the database (SQLite file) and its schema if there is none.

    Raises:
        StorageError: Unknown scheme, or the database cannot be opened, is missing, empty, damaged
            (:class:`~fedfer.aggregator.storage.base.StorageCorruptError`) or without the schema.
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
        return SqliteStorage(path, busy_timeout_s=timeout_s, synchronous=synchronous, now=when, create=create)
    if url.startswith(("postgresql://", "postgres://")):
        from fedfer.aggregator.storage.postgres import PostgresStorage

        return PostgresStorage(url, connect_timeout_s=timeout_s, now=when, create=create)
    raise StorageError(f"unsupported storage URL scheme in {redact_url(url)!r}")
