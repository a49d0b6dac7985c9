"""The aggregator's storage interface: record types, errors and the :class:`Storage` contract.

Every backend (SQLite in :mod:`fedfer.aggregator.storage.sqlite`, PostgreSQL in
:mod:`fedfer.aggregator.storage.postgres`) implements :class:`Storage` and passes one contract test suite.
Operations that two aggregator replicas could race on are single statements guarded by database constraints,
so exactly one caller wins:

* claiming an enrollment token (:meth:`Storage.enroll_device`),
* opening a round while another round of the same cohort is active (:meth:`Storage.create_round`),
* advancing a round (:meth:`Storage.update_round` is compare-and-set on :attr:`RoundRecord.version`),
* recording the response to a request id (:meth:`Storage.record_response`),
* storing one device's message for one stage (:meth:`Storage.put_round_message`),
* publishing a model version (:meth:`Storage.put_model`), alone or together with the round that produced it
  (:meth:`Storage.publish_round`, one transaction),
* taking or renewing a named lease (:meth:`Storage.acquire_lease`): the leader election of the replicas.

Times are timezone-aware UTC :class:`~datetime.datetime` values, stored with microsecond precision. The
storage layer never reads the clock: callers pass ``now``.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedfer.security.errors import FedferError
from fedfer.security.secagg.stage import Stage

__all__ = [
    "ConflictError",
    "DeviceRecord",
    "JsonValue",
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
]

JsonValue = Any
"""A value that :func:`json.dumps` accepts (dicts with str keys, lists, str, int, float, bool, None)."""


class StorageError(FedferError):
    """The storage backend failed or was given something it cannot store."""


class StorageUnavailableError(StorageError):
    """The backend could not complete the operation now (busy, connection lost, disk full); nothing was
    changed, and the same call may succeed later."""


class StorageFullError(StorageUnavailableError):
    """The disk (or the database's quota) is full: nothing was written; retry once space is freed."""


class StorageCorruptError(StorageError):
    """The stored data cannot be read back as written (a damaged, truncated or overwritten database).

    Nothing is changed and nothing is repaired: the file or database is left exactly as found.
    """


class ConflictError(StorageError):
    """A uniqueness or compare-and-set constraint refused the write: another caller got there first."""


class NotFoundError(StorageError):
    """The addressed record does not exist."""


@dataclass(frozen=True)
class DeviceRecord:
    """A registered device.

    Attributes:
        device_id: The identity the protocol trusts (``[a-z0-9-]{3,64}``), also the certificate's CN.
        cert_fingerprint: Lower-case hex SHA-256 of the device certificate's DER encoding.
        cert_serial: The device certificate's serial number (used for revocation).
        identity_public_key: Raw 32-byte Ed25519 public key that signs the device's round keys.
        created_at: When the device enrolled.
        revoked_at: When the device was revoked, or None while it is in good standing.
    """

    device_id: str
    cert_fingerprint: str
    cert_serial: int
    identity_public_key: bytes = field(repr=False)
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None

    @property
    def revoked(self) -> bool:
        """True once the device has been revoked."""
        return self.revoked_at is not None


@dataclass(frozen=True)
class TokenRecord:
    """A one-time enrollment token, known to storage only by its hash.

    Attributes:
        token_hash: SHA-256 digest of the token (the token itself is never stored).
        created_at: When the token was issued.
        expires_at: After this instant the token is refused.
        label: Free-text note for operators (never secret).
        used_at: When the token was consumed, or None if unused.
        device_id: The device that consumed it, or None if unused.
    """

    token_hash: bytes = field(repr=False)
    created_at: dt.datetime
    expires_at: dt.datetime
    label: str = ""
    used_at: dt.datetime | None = None
    device_id: str | None = None


@dataclass(frozen=True)
class RoundRecord:
    """One secure-aggregation round.

    Attributes:
        round_id: Increasing integer id (unique, not necessarily contiguous).
        cohort: Population the round belongs to; at most one active round per cohort.
        status: The round's :class:`~fedfer.security.secagg.stage.Stage` (never ``IDLE``): ``CHECK_IN`` →
            the five collecting stages → ``FINISHED`` (published); any stage before ``FINISHED`` may go to
            ``ABORTED``. The collecting stages also name a message's stage in
            :meth:`Storage.put_round_message`. The storage layer does not enforce the order (the orchestrator
            does); it enforces that a round is changed only by the holder of its current version.
        params: Round parameters as JSON (min clients, threshold, deadlines, ...).
        created_at: When the round was opened.
        updated_at: Last change of status, state or participants.
        finished_at: When it reached a terminal status, else None.
        model_version: Registry version of the central model the round published, else None.
        state: Opaque protocol state the orchestrator persists across restarts.
        participants: Devices whose input the round aggregated (set when it is published), sorted.
        version: Compare-and-set counter; every :meth:`Storage.update_round` increments it.
    """

    round_id: int
    cohort: str
    status: Stage
    params: Mapping[str, JsonValue]
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    model_version: int | None
    state: bytes = field(repr=False)
    participants: tuple[str, ...]
    version: int


@dataclass(frozen=True)
class ResponseRecord:
    """The stored answer to an idempotent request.

    Attributes:
        scope: Namespace of the request id (for example the device id and RPC method).
        request_id: Client-chosen id; a retry with the same id gets the same response.
        request_digest: Digest of the request body, so a different request reusing the id is detected.
        response: The serialized response returned the first time.
        created_at: When the response was recorded.
    """

    scope: str
    request_id: str
    request_digest: bytes = field(repr=False)
    response: bytes = field(repr=False)
    created_at: dt.datetime


@dataclass(frozen=True)
class ModelRecord:
    """A stored version of the central model, as produced by :mod:`fedfer.aggregator.registry`.

    Attributes:
        version: Positive integer version.
        parent: Version this one was derived from, or None for the first.
        manifest: Canonical JSON text describing the arrays in ``blob``.
        digest: Lower-case hex SHA-256 over manifest and blob (checked by the registry on read).
        blob: Concatenated array bytes.
        created_at: When the version was published.
        origin: Where the version came from, at most 256 characters: ``shipped:vfer-6@<sha256 prefix>`` (a
            shipped trained v), ``random:seed=0`` (a requested random init), ``import:<file>@<sha256 prefix>``
            (``fedfer-aggregator import-model``) or ``round:<round id>`` (aggregated). Versions stored before
            schema version 3 read ``round:<id>`` when a published round names them, else ``unrecorded``.
    """

    version: int
    parent: int | None
    manifest: str
    digest: str
    blob: bytes = field(repr=False)
    created_at: dt.datetime
    origin: str


@dataclass(frozen=True)
class ModelInfo:
    """What :meth:`Storage.list_models` tells of a stored version: a :class:`ModelRecord` without its blob
    (the manifest gives the shapes; nothing here is checked against the digest)."""

    version: int
    parent: int | None
    manifest: str
    digest: str
    created_at: dt.datetime
    origin: str


@dataclass(frozen=True)
class LeaseRecord:
    """A named lease: which replica holds it and until when.

    Attributes:
        name: What the lease guards (for example ``coordinator/default``).
        owner: Id of the replica holding it.
        acquired_at: When this owner took it (renewals keep this time).
        expires_at: The owner holds it until this instant unless it renews; after it anyone may take it.
    """

    name: str
    owner: str
    acquired_at: dt.datetime
    expires_at: dt.datetime


class Storage(abc.ABC):
    """Durable state of an aggregator deployment.

    Implementations are safe to share between threads of one process and between processes (and replicas)
    using the same database. Obtain one with :func:`fedfer.aggregator.storage.open_storage`; close it with
    :meth:`close` or use it as a context manager.
    """

    # -- life cycle ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection. Further calls raise :class:`StorageError`."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """Return the schema version the database is migrated to."""

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- enrollment tokens --------------------------------------------------------------------------------

    @abc.abstractmethod
    def add_token(self, token: TokenRecord) -> None:
        """Store a new, unused enrollment token.

        Raises:
            ConflictError: A token with the same hash exists.
            StorageError: ``token`` is already used.
        """

    @abc.abstractmethod
    def get_token(self, token_hash: bytes) -> TokenRecord | None:
        """Return the token with this hash, or None."""

    @abc.abstractmethod
    def spend_token(self, token_hash: bytes, *, now: dt.datetime) -> bool:
        """Mark an unused, unexpired token used without registering a device (a refused enrollment that must
        not be tried again with the same token).

        Returns:
            True if the token was spent now, False if it was unknown, expired or already used.
        """

    @abc.abstractmethod
    def delete_expired_tokens(self, *, now: dt.datetime) -> int:
        """Delete unused tokens that expired before ``now``; return how many were deleted."""

    # -- devices ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def enroll_device(self, *, token_hash: bytes, device: DeviceRecord, now: dt.datetime) -> DeviceRecord:
        """Atomically consume an unused, unexpired token and register ``device``.

        Either both happen or neither: a refused registration leaves the token usable.

        Raises:
            ConflictError: The token is unknown, expired or already used (deliberately not told apart), or
                the device id, certificate serial or fingerprint is already registered.
        """

    @abc.abstractmethod
    def get_device(self, device_id: str) -> DeviceRecord | None:
        """Return the device with this id, or None."""

    @abc.abstractmethod
    def list_devices(self, *, include_revoked: bool = True) -> list[DeviceRecord]:
        """Return registered devices ordered by id."""

    @abc.abstractmethod
    def revoke_device(self, device_id: str, *, now: dt.datetime) -> DeviceRecord:
        """Mark a device revoked (idempotent: a second call keeps the first time).

        Raises:
            NotFoundError: No such device.
        """

    @abc.abstractmethod
    def revoked_serials(self) -> frozenset[int]:
        """Return the certificate serial numbers of all revoked devices."""

    # -- rounds -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def create_round(
        self,
        *,
        params: Mapping[str, JsonValue],
        now: dt.datetime,
        cohort: str = "default",
        state: bytes = b"",
    ) -> RoundRecord:
        """Open a new round with status ``OPEN`` and version 1.

        Raises:
            ConflictError: The cohort already has an active round (exactly one racing caller wins).
            StorageError: ``params`` is not JSON-serializable.
        """

    @abc.abstractmethod
    def get_round(self, round_id: int) -> RoundRecord | None:
        """Return the round with this id, or None."""

    @abc.abstractmethod
    def active_round(self, cohort: str = "default") -> RoundRecord | None:
        """Return the cohort's round that is not yet published or aborted, or None."""

    @abc.abstractmethod
    def list_rounds(self, *, cohort: str | None = None, limit: int = 100) -> list[RoundRecord]:
        """Return the most recent rounds, newest first."""

    @abc.abstractmethod
    def update_round(
        self,
        round_id: int,
        *,
        expected_version: int,
        now: dt.datetime,
        status: Stage | None = None,
        state: bytes | None = None,
        participants: Sequence[str] | None = None,
        model_version: int | None = None,
    ) -> RoundRecord:
        """Compare-and-set: change the round only if its version is still ``expected_version``.

        Fields left as None are unchanged. Moving to a terminal status sets ``finished_at``. A terminal
        round cannot be changed any more.

        Raises:
            NotFoundError: No such round.
            ConflictError: The version moved on (someone else updated it) or the round is terminal.
        """

    @abc.abstractmethod
    def publish_round(
        self,
        round_id: int,
        *,
        expected_version: int,
        now: dt.datetime,
        model: ModelRecord,
        participants: Sequence[str],
    ) -> RoundRecord:
        """In one transaction: store ``model`` as a new version and mark the round ``PUBLISHED`` with it.

        Both happen or neither does, so a crash can never leave a published model whose round still looks
        unfinished (which a resumed round would publish a second time).

        Raises:
            NotFoundError: No such round.
            ConflictError: The round's version is not ``expected_version`` (someone else changed it), the
                round is finished, or ``model.version`` already exists. Nothing is written.
        """

    @abc.abstractmethod
    def put_round_message(
        self, round_id: int, *, stage: Stage, device_id: str, payload: bytes, now: dt.datetime
    ) -> bool:
        """Store one device's message for one stage of a round, first write wins.

        Returns:
            True if stored, False if an identical payload was already stored (a harmless retry).

        Raises:
            NotFoundError: No such round.
            ConflictError: A different payload is already stored for this (round, stage, device).
        """

    @abc.abstractmethod
    def round_messages(
        self, round_id: int, *, stage: Stage, device_ids: Collection[str] | None = None
    ) -> dict[str, bytes]:
        """Return ``{device_id: payload}`` of the messages stored for one stage of a round.

        Args:
            round_id: the round.
            stage: the collecting stage.
            device_ids: only these devices' messages (None: every device's).
        """

    @abc.abstractmethod
    def round_message_senders(self, round_id: int, *, stage: Stage) -> frozenset[str]:
        """Return the ids of the devices that have a message stored for one stage of a round (no payloads)."""

    # -- idempotency --------------------------------------------------------------------------------------

    @abc.abstractmethod
    def record_response(
        self, *, scope: str, request_id: str, request_digest: bytes, response: bytes, now: dt.datetime
    ) -> ResponseRecord:
        """Record the response to a request id unless one is recorded; return the record that won.

        Two racing callers both get the first stored record, so a retried request is answered identically.

        Raises:
            ConflictError: The request id was already used with a different ``request_digest``.
        """

    @abc.abstractmethod
    def get_response(self, *, scope: str, request_id: str) -> ResponseRecord | None:
        """Return the recorded response for a request id, or None."""

    @abc.abstractmethod
    def delete_responses_before(self, *, before: dt.datetime) -> int:
        """Forget idempotency records created before ``before``; return how many."""

    # -- leases -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def acquire_lease(self, name: str, *, owner: str, now: dt.datetime, ttl: dt.timedelta) -> LeaseRecord:
        """Take the lease ``name`` for ``owner`` until ``now + ttl``, or renew it if ``owner`` holds it.

        One statement decides: the lease changes hands only when nobody holds it or its holder's
        ``expires_at`` is not after ``now``, so of racing callers exactly one gets a free or expired lease.

        Returns:
            The lease as stored afterwards; ``owner`` holds it exactly when ``record.owner == owner``.

        Raises:
            StorageError: ``ttl`` is not positive or a name/owner is not a short non-empty string.
        """

    @abc.abstractmethod
    def release_lease(self, name: str, *, owner: str) -> bool:
        """Give the lease up if ``owner`` holds it, so another replica can take it at once.

        Returns:
            True if ``owner`` held it and it was released.
        """

    @abc.abstractmethod
    def get_lease(self, name: str) -> LeaseRecord | None:
        """Return the lease ``name`` (expired or not), or None if nobody has taken it."""

    # -- model registry -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def put_model(self, model: ModelRecord) -> bool:
        """Store a model version, first write wins.

        Returns:
            True if stored, False if the same version with the same digest already exists.

        Raises:
            ConflictError: The version exists with a different digest.
        """

    @abc.abstractmethod
    def get_model(self, version: int) -> ModelRecord | None:
        """Return one model version, or None."""

    @abc.abstractmethod
    def latest_model_version(self) -> int | None:
        """Return the highest stored model version, or None when the registry is empty."""

    @abc.abstractmethod
    def list_model_versions(self) -> list[int]:
        """Return every stored model version, ascending."""

    @abc.abstractmethod
    def list_models(self) -> list[ModelInfo]:
        """Return every stored model version without its blob (manifest, digest, origin ...), ascending."""
