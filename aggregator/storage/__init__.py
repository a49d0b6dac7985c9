"""Durable aggregator state behind one interface, with SQLite (default) and PostgreSQL backends.

Pick a backend by URL with :func:`open_storage`: ``sqlite:///absolute/path.db`` (or ``sqlite:relative.db``)
or ``postgresql://user@host:port/dbname``.
"""

from fedfer.aggregator.storage.base import (
    ACTIVE_STATUSES,
    ConflictError,
    DeviceRecord,
    LeaseRecord,
    ModelRecord,
    NotFoundError,
    ResponseRecord,
    RoundRecord,
    RoundStatus,
    Storage,
    StorageError,
    TokenRecord,
)
from fedfer.aggregator.storage.factory import open_storage, redact_url

__all__ = [
    "ACTIVE_STATUSES",
    "ConflictError",
    "DeviceRecord",
    "LeaseRecord",
    "ModelRecord",
    "NotFoundError",
    "ResponseRecord",
    "RoundRecord",
    "RoundStatus",
    "Storage",
    "StorageError",
    "TokenRecord",
    "open_storage",
    "redact_url",
]
