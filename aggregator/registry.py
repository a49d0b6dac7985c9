"""The model registry: versions of the central model ``v`` as named float32 arrays.

Each version is stored in canonical form (:mod:`fedfer.security.model_codec`: manifest, blob, SHA-256) with
its parent version. Every read recomputes the digest, so a blob changed behind the registry's back raises
:class:`~fedfer.security.errors.IntegrityError` instead of being served to devices.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedfer.aggregator.storage.base import ConflictError, ModelRecord, NotFoundError, Storage
from fedfer.security.errors import ValidationError
from fedfer.security.model_codec import MAX_MODEL_BYTES, decode_model, encode_model

__all__ = ["ModelRegistry", "ModelVersion"]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class ModelVersion:
    """One verified version of the central model.

    Attributes:
        version: Positive version number.
        parent: Version it was derived from, or None.
        arrays: Name → read-only float32 array.
        manifest: Canonical manifest JSON (what devices verify against).
        blob: Canonical array bytes (what devices download).
        digest: Lower-case hex SHA-256 over manifest and blob.
        created_at: When it was published.
    """

    version: int
    parent: int | None
    arrays: Mapping[str, npt.NDArray[np.float32]] = field(repr=False)
    manifest: str = field(repr=False)
    blob: bytes = field(repr=False)
    digest: str
    created_at: dt.datetime

    @property
    def num_parameters(self) -> int:
        """Total number of scalars across all arrays."""
        return sum(int(a.size) for a in self.arrays.values())


class ModelRegistry:
    """Publish and fetch model versions over a :class:`~fedfer.aggregator.storage.base.Storage`.

    Args:
        storage: Where versions live.
        max_bytes: Largest accepted model (array bytes).
        clock: Returns the current UTC time (a seam for tests).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        max_bytes: int = MAX_MODEL_BYTES,
        clock: Callable[[], dt.datetime] = _utc_now,
    ) -> None:
        if not isinstance(storage, Storage):
            raise ValidationError("storage must be a Storage")
        if type(max_bytes) is not int or max_bytes <= 0:
            raise ValidationError("max_bytes must be a positive int")
        self._storage = storage
        self._max_bytes = max_bytes
        self._clock = clock

    def publish(
        self, version: int, arrays: Mapping[str, npt.NDArray[Any]], *, parent: int | None
    ) -> ModelVersion:
        """Store ``arrays`` as ``version`` (idempotent for identical content).

        Args:
            version: New version number, greater than ``parent``.
            arrays: Name → finite float32 array.
            parent: An existing earlier version, or None for the first model.

        Raises:
            ValidationError: Bad version numbers or arrays.
            NotFoundError: ``parent`` does not exist.
            ConflictError: ``version`` exists with different content.
        """
        record = self.prepare(version, arrays, parent=parent)
        if not self._storage.put_model(record):
            existing = self.get(version)
            if existing.parent != parent:
                raise ConflictError("model version already exists with a different parent")
            return existing
        return self._verified(record)

    def prepare(
        self, version: int, arrays: Mapping[str, npt.NDArray[Any]], *, parent: int | None
    ) -> ModelRecord:
        """Check and encode ``arrays`` as the record of ``version`` without storing it.

        For callers that store the version together with other changes in one transaction
        (:meth:`~fedfer.aggregator.storage.base.Storage.publish_round`). Raises as :meth:`publish` does.
        """
        if type(version) is not int or version <= 0:
            raise ValidationError("model version must be a positive int")
        if parent is not None:
            if type(parent) is not int or not 0 < parent < version:
                raise ValidationError("parent must be an earlier positive version")
            if self._storage.get_model(parent) is None:
                raise NotFoundError("parent model version does not exist")
        encoded = encode_model(arrays, max_bytes=self._max_bytes)
        return ModelRecord(
            version=version,
            parent=parent,
            manifest=encoded.manifest,
            digest=encoded.digest,
            blob=encoded.blob,
            created_at=self._clock(),
        )

    def get(self, version: int) -> ModelVersion:
        """Return a verified model version.

        Raises:
            NotFoundError: No such version.
            IntegrityError: The stored version fails its digest check.
        """
        record = self._storage.get_model(version)
        if record is None:
            raise NotFoundError("no such model version")
        return self._verified(record)

    def latest(self) -> ModelVersion | None:
        """Return the newest verified version, or None when nothing is published yet."""
        version = self._storage.latest_model_version()
        return None if version is None else self.get(version)

    def versions(self) -> list[int]:
        """Return every published version, ascending."""
        return self._storage.list_model_versions()

    def _verified(self, record: ModelRecord) -> ModelVersion:
        arrays = decode_model(record.manifest, record.blob, record.digest, max_bytes=self._max_bytes)
        return ModelVersion(
            version=record.version,
            parent=record.parent,
            arrays=arrays,
            manifest=record.manifest,
            blob=record.blob,
            digest=record.digest,
            created_at=record.created_at,
        )
