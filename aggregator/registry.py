"""The model registry: versions of the central model ``v`` as named float32 arrays.

Each version is stored in canonical form (:mod:`fedfer.security.model_codec`: manifest, blob, SHA-256) with
its parent version and its origin (``shipped:``, ``random:``, ``import:`` or ``round:``; see
:class:`~fedfer.aggregator.storage.base.ModelRecord`). Every read recomputes the digest, so a blob changed
behind the registry's back raises :class:`~fedfer.security.errors.IntegrityError` instead of being served to
devices. :func:`lineage_start` tells which published v a version's aggregated rounds started from, so an
operator (``fedfer-aggregator status``, ``serve``) sees whether federation began from a trained or a random v.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedfer.aggregator.storage.base import ConflictError, ModelInfo, ModelRecord, NotFoundError, Storage
from fedfer.security.errors import ValidationError
from fedfer.security.model_codec import MAX_MODEL_BYTES, decode_model, encode_model, manifest_layout

__all__ = [
    "ORIGIN_KINDS",
    "UNRECORDED_ORIGIN",
    "ModelRegistry",
    "ModelSummary",
    "ModelVersion",
    "check_origin",
    "lineage_start",
]

#: What an origin may start with (``kind:detail``): a shipped trained v, a requested random init, an imported
#: file, an aggregated round.
ORIGIN_KINDS = ("shipped", "random", "import", "round")
#: The origin storage reports for a version stored before origins were recorded (schema version 3).
UNRECORDED_ORIGIN = "unrecorded"
_ORIGIN = re.compile(r"(?:shipped|random|import|round):[A-Za-z0-9_.=@+-]{1,240}")


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
        origin: Where it came from (``shipped:...``, ``random:...``, ``import:...``, ``round:...``).
    """

    version: int
    parent: int | None
    arrays: Mapping[str, npt.NDArray[np.float32]] = field(repr=False)
    manifest: str = field(repr=False)
    blob: bytes = field(repr=False)
    digest: str
    created_at: dt.datetime
    origin: str

    @property
    def num_parameters(self) -> int:
        """Total number of scalars across all arrays."""
        return sum(int(a.size) for a in self.arrays.values())


@dataclass(frozen=True)
class ModelSummary:
    """A published version as listed by :meth:`ModelRegistry.summaries` (no arrays, digest not rechecked).

    Attributes:
        version: Positive version number.
        parent: Version it was derived from, or None.
        origin: Where it came from (see :class:`ModelVersion`).
        digest: Lower-case hex SHA-256 over manifest and blob.
        parameters: Total number of scalars, from the manifest's shapes.
        created_at: When it was published.
    """

    version: int
    parent: int | None
    origin: str
    digest: str
    parameters: int
    created_at: dt.datetime

    @property
    def origin_kind(self) -> str:
        """``shipped``, ``random``, ``import``, ``round`` or ``unrecorded``."""
        return self.origin.partition(":")[0]


def check_origin(origin: object) -> str:
    """Return ``origin`` if it is ``kind:detail`` with a kind of :data:`ORIGIN_KINDS` and a short detail of
    letters, digits and ``_.=@+-``.

    Raises:
        ValidationError: Anything else.
    """
    if type(origin) is not str or _ORIGIN.fullmatch(origin) is None:
        raise ValidationError(
            "model origin must be shipped:, random:, import: or round: and up to 240 of [A-Za-z0-9_.=@+-]"
        )
    return origin


def lineage_start(summaries: Sequence[ModelSummary], version: int) -> ModelSummary:
    """The version whose arrays ``version`` was aggregated from: walk back through parents while the origin
    is ``round:`` (a round adds the devices' mean update to its parent; any other origin starts a lineage).

    Raises:
        NotFoundError: ``version`` or a parent on the way is not in ``summaries``.
    """
    by_version = {s.version: s for s in summaries}
    current = by_version.get(version)
    while current is not None and current.origin_kind == "round" and current.parent is not None:
        # Parents are earlier versions (prepare() enforces it), so the walk ends; a stored row saying
        # otherwise ends it too.
        current = by_version.get(current.parent) if current.parent < current.version else None
    if current is None:
        raise NotFoundError("model version or one of its parents does not exist")
    return current


def _summary(info: ModelInfo) -> ModelSummary:
    layout = manifest_layout(info.manifest)
    return ModelSummary(
        version=info.version,
        parent=info.parent,
        origin=info.origin,
        digest=info.digest,
        parameters=sum(int(np.prod(shape, dtype=np.int64)) for _, shape in layout),
        created_at=info.created_at,
    )


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
        self, version: int, arrays: Mapping[str, npt.NDArray[Any]], *, parent: int | None, origin: str
    ) -> ModelVersion:
        """Store ``arrays`` as ``version`` (idempotent for identical content, parent and origin).

        Args:
            version: New version number, greater than ``parent``.
            arrays: Name → finite float32 array.
            parent: An existing earlier version, or None for the first model.
            origin: Where the arrays come from (:func:`check_origin`), stored with the version.

        Raises:
            ValidationError: Bad version numbers, arrays or origin.
            NotFoundError: ``parent`` does not exist.
            ConflictError: ``version`` exists with different content, parent or origin.
        """
        record = self.prepare(version, arrays, parent=parent, origin=origin)
        if not self._storage.put_model(record):
            existing = self.get(version)
            if existing.parent != parent:
                raise ConflictError("model version already exists with a different parent")
            if existing.origin != origin:
                raise ConflictError("model version already exists with a different origin")
            return existing
        return self._verified(record)

    def prepare(
        self, version: int, arrays: Mapping[str, npt.NDArray[Any]], *, parent: int | None, origin: str
    ) -> ModelRecord:
        """Check and encode ``arrays`` as the record of ``version`` without storing it.

        For callers that store the version together with other changes in one transaction
        (:meth:`~fedfer.aggregator.storage.base.Storage.publish_round`). Raises as :meth:`publish` does.
        """
        check_origin(origin)
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
            origin=origin,
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

    def summaries(self) -> list[ModelSummary]:
        """Every published version without its arrays (origin, digest, parameter count), ascending.

        Reads manifests only; the digests are checked when a version is read with :meth:`get`.
        """
        return [_summary(info) for info in self._storage.list_models()]

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
            origin=record.origin,
        )
