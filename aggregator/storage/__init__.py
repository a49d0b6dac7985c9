"""Durable aggregator state behind one interface, with SQLite (default) and PostgreSQL backends.

Pick a backend by URL with :func:`open_storage`: ``sqlite:///absolute/path.db`` (or ``sqlite:relative.db``)
or ``postgresql://user@host:port/dbname``.
"""

from fedfer.aggregator.storage.base import (
    ConflictError,
    DeviceRecord,
    LeaseRecord,
    ModelInfo,
    ModelRecord,
    NotFoundError,
    ResponseRecord,
    RoundRecord,
    Storage,
    StorageCorruptError,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
    TokenRecord,
)
from fedfer.aggregator.storage.factory import open_storage, redact_url

__all__ = [
    "ConflictError",
    "DeviceRecord",
    "LeaseRecord",
    "ModelInfo",
    "ModelRecord",
    "NotFoundError",
    "ResponseRecord",
    "RoundRecord",
    "Storage",
    "StorageCorruptError",
    "StorageError",
    "StorageFullError",
    "StorageUnavailableError",
    "TokenRecord",
    "open_storage",
    "redact_url",
]
