"""Round orchestration: drive the secure-aggregation server through its stages, with deadlines, in sequence.

One :class:`RoundCoordinator` runs inside the aggregator's event loop. For each round it:

1. **check-in** (storage status ``OPEN``): opens a round on the latest central model version; enrolled devices
   ask to join (:meth:`RoundCoordinator.join`) and get a client index 1..n. Check-in closes when
   ``max_clients`` joined, or once ``min_clients`` joined and ``checkin_s`` more seconds passed (before
   ``min_clients`` it keeps waiting: nobody has committed anything yet). The protocol parameters (n, the
   SecAgg+ degree, the threshold, a fresh random 32-byte protocol round id) are fixed then;
2. **advertise keys, share keys, masked input, consistency check, unmask**: collects one message per eligible
   device and closes
   the stage when all arrived or at the stage's deadline; devices that missed it become dropouts, exactly as
   :class:`fedfer.security.secagg.server.SecAggServer` defines;
3. publishes the weighted mean of the survivors' updates as the next central model version.

**What is averaged.** Devices upload the *delta* ``v_local - v_central`` from the round's base version,
flattened in manifest order (array names sorted, C order), clipped to ``[-clip, clip]`` and quantized by the
codec together with an integer weight (example count). The aggregator publishes
``v_next = v_central + weighted_mean(delta)`` as version ``latest + 1`` with the base version as parent.

Fewer survivors than the threshold at any stage aborts the round (the protocol reveals nothing) and nothing is
published.

**Leadership.** Only the replica holding the cohort's lease (:class:`fedfer.aggregator.leader.LeaderLease`)
coordinates: :meth:`RoundCoordinator.run` first waits as a standby until it gets the lease, and the service
refuses federation calls while :attr:`RoundCoordinator.is_leader` is false. A standby never reads or changes
the active round. A leader that loses the lease stops at once
(:class:`~fedfer.aggregator.leader.LeadershipLostError`) without aborting its round, which the next leader
resumes.

**Restarts and takeovers.** At every stage transition the round's status and its resumable state (public
parameters, the device/index map, device certificates, identity public keys and the protocol server's
snapshot) are written to storage, and every accepted device message is stored as it arrives. A coordinator
that becomes leader (after a restart, or taking over from a replica that died) restores the protocol server,
replays the stored messages of the current stage and resumes the round with a fresh stage deadline (devices
just retry until it is back; their acknowledged messages are not needed again). A round interrupted during
check-in, or whose state cannot be restored, is aborted instead. The published model and the round's
``PUBLISHED`` status are written in one transaction, so a round is never published twice. Finished rounds and
registered devices are never lost.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from fedfer.aggregator.leader import LeaderLease, LeadershipLostError, LeaseExpiredError
from fedfer.aggregator.registry import ModelRegistry
from fedfer.aggregator.storage import ConflictError, RoundRecord, Storage, StorageUnavailableError
from fedfer.security.errors import FedferError, ProtocolError, RoundAbortedError, ValidationError
from fedfer.security.secagg.graph import NeighbourGraph
from fedfer.security.secagg.messages import STAGE_MESSAGE, Message
from fedfer.security.secagg.params import SecAggParams, default_neighbors, default_threshold
from fedfer.security.secagg.server import (
    AggregateResult,
    InvalidAggregateError,
    MisbehaviourError,
    SecAggServer,
    ShareVerificationError,
)
from fedfer.security.secagg.stage import COLLECTING, Stage

__all__ = [
    "NO_MODEL_MESSAGE",
    "DuplicateSubmissionError",
    "NotLeaderError",
    "NotParticipantError",
    "RoundCoordinator",
    "RoundSettings",
    "RoundView",
    "StageError",
    "StaleRoundError",
]

_log = logging.getLogger(__name__)
T = TypeVar("T")
_STORAGE_RETRY_S = 0.5  # between attempts at a write the storage refused for now (a full disk)
#: Logged (once per wait) while the registry holds no central v: rounds start only from a published model.
NO_MODEL_MESSAGE = (
    "no central model is published: no round starts until one is (publish one with `fedfer-aggregator "
    "import-model DIR FILE.npz`, or create the deployment with `fedfer-aggregator init` and its default "
    "--initial-model shipped); enrollment is served meanwhile"
)


def _following(stage: Stage) -> Stage:
    """The stage a round enters when ``stage`` (check-in or a collecting stage) closes."""
    after = stage.following
    if after is None:  # pragma: no cover - only open stages close
        raise ValidationError(f"stage {stage.name} does not close")
    return after


_STATE_FORMAT = "fedfer-round-state/v1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class StageError(ProtocolError):
    """A message arrived for a stage that is not the round's current stage."""


class StaleRoundError(ProtocolError):
    """A message names a round that is not the current one (finished, unknown, or an earlier round)."""


class NotParticipantError(ProtocolError):
    """The device is not (or no longer) a participant of this round, or claims another participant's index."""


class DuplicateSubmissionError(ProtocolError):
    """The device already had a different message accepted for this stage."""


class _HandedOver(FedferError):
    """The coordinator stopped and leaves the round in progress to the next leader."""


class _BudgetSpent(RoundAbortedError):
    """A stage would start after the round's time budget ran out."""


class NotLeaderError(FedferError):
    """This replica is a standby (or lost the lease): another replica coordinates the rounds."""


LeadershipListener = Callable[[bool], Awaitable[None]]
"""Awaited with True when the coordinator starts leading (after recovery) and False when it stops."""


def _positive(name: str, value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ValidationError(f"{name} must be a positive number")
    return float(value)


@dataclass(frozen=True)
class RoundSettings:
    """Parameters of every round the coordinator runs.

    Attributes:
        min_clients: fewest devices that must check in before the round proceeds (>= 2).
        max_clients: most devices admitted to one round (>= min_clients).
        threshold: Shamir threshold: None for the protocol default (a strict majority of each device's share
            holders), an int count, or a float fraction of the holders (in (0.5, 1]).
        degree: SecAgg+ neighbour count: 0 for the complete graph (plain SecAgg), -1 for the protocol
            default (O(log n)), else an even k >= 2 (capped at n - 1).
        checkin_s: how long check-in stays open once ``min_clients`` joined.
        advertise_s, share_s, masked_s, consistency_s, unmask_s: per-stage deadlines in seconds.
        straggler_grace_s: a device whose message of a stage arrives more than this after half of that
            stage's messages is a straggler for the rest of the round: once every other device has sent, a
            later stage waits at most this much longer for it (then it is a dropout).
        budget_s: overall time budget of a round's protocol stages, counted from the end of check-in (after
            a restart, from the resume): no stage deadline runs past it, and a stage that would start after
            it aborts the round.
        rounds: how many rounds to finish before :meth:`RoundCoordinator.run` returns (0 = forever).
        clip: each delta coordinate is clipped to [-clip, clip] before quantization.
        max_weight: largest example count a device may claim as its weight.
        modulus_bits: k of the integers mod 2^k the masked vectors live in.
        cohort: storage cohort of the rounds.
    """

    min_clients: int = 3
    max_clients: int = 100
    threshold: int | float | None = None
    degree: int = -1
    checkin_s: float = 5.0
    advertise_s: float = 20.0
    share_s: float = 20.0
    masked_s: float = 60.0
    consistency_s: float = 20.0
    unmask_s: float = 20.0
    straggler_grace_s: float = 10.0
    budget_s: float = 600.0
    rounds: int = 0
    clip: float = 1.0
    max_weight: int = 10_000
    modulus_bits: int = 32
    cohort: str = "default"

    def __post_init__(self) -> None:
        for name in ("min_clients", "max_clients", "degree", "rounds", "max_weight", "modulus_bits"):
            if type(getattr(self, name)) is not int:
                raise ValidationError(f"{name} must be an int")
        if not 2 <= self.min_clients <= self.max_clients:
            raise ValidationError("need 2 <= min_clients <= max_clients")
        for name in (
            "checkin_s",
            "advertise_s",
            "share_s",
            "masked_s",
            "consistency_s",
            "unmask_s",
            "straggler_grace_s",
            "budget_s",
            "clip",
        ):
            _positive(name, getattr(self, name))
        t = self.threshold
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, int | float):
                raise ValidationError("threshold must be None, an int count or a float fraction")
            if isinstance(t, int) and t < 2:
                raise ValidationError("threshold count must be >= 2")
            if isinstance(t, float) and not 0.5 < t <= 1.0:
                raise ValidationError("threshold fraction must be in (0.5, 1]")
        if self.degree < -1 or self.degree == 1 or (self.degree > 1 and self.degree % 2):
            raise ValidationError("degree must be -1 (default), 0 (complete) or an even number >= 2")
        if self.rounds < 0 or self.max_weight < 1 or not 8 <= self.modulus_bits <= 62:
            raise ValidationError("rounds must be >= 0, max_weight >= 1 and modulus_bits in 8..62")
        if type(self.cohort) is not str or not self.cohort:
            raise ValidationError("cohort must be a non-empty string")

    def neighbors_for(self, n: int) -> int:
        """The neighbour-graph degree for a round of ``n`` devices."""
        if self.degree == -1:
            return default_neighbors(n)
        if self.degree == 0 or self.degree >= n - 1:
            return n - 1
        return self.degree

    def threshold_for(self, n: int, neighbors: int) -> int:
        """The Shamir threshold for ``n`` devices with degree ``neighbors`` (2 <= t <= neighbors + 1)."""
        holders = min(neighbors, n - 1) + 1
        if self.threshold is None:
            return default_threshold(n, neighbors)
        t = self.threshold if isinstance(self.threshold, int) else math.ceil(self.threshold * holders)
        return max(2, min(holders, t))

    def deadline_s(self, stage: Stage) -> float:
        """The deadline of a protocol stage, in seconds."""
        return {
            Stage.ADVERTISE_KEYS: self.advertise_s,
            Stage.SHARE_KEYS: self.share_s,
            Stage.MASKED_INPUT: self.masked_s,
            Stage.CONSISTENCY_CHECK: self.consistency_s,
            Stage.UNMASK: self.unmask_s,
        }[stage]


@dataclass(frozen=True)
class RoundView:
    """A round as one device sees it.

    Attributes:
        round_id: the round (0 when idle).
        stage: its stage.
        model_version: the base model version of the round, or for a finished round the version it
            published ("" when none).
        dim: length of the update vector (0 when idle).
        deadline_unix_ms: when the current stage closes (0 if it has no fixed deadline yet).
        participant: whether the device takes part (for a finished round: whether its input was used).
        client_index: the device's index 1..n in the round (0 if none).
        completed: stages the device has completed in this round.
        parameters: the protocol's public parameters (``SecAggParams.to_bytes()``), once check-in closed.
        latest_model_version: newest published version ("" if none).
        detail: sanitized reason for an abort.
    """

    round_id: int
    stage: Stage
    model_version: str = ""
    dim: int = 0
    deadline_unix_ms: int = 0
    participant: bool = False
    client_index: int = 0
    completed: tuple[Stage, ...] = ()
    parameters: bytes = b""
    latest_model_version: str = ""
    detail: str = ""


@dataclass
class _Round:
    round_id: int
    version: int  # storage compare-and-set version
    base_version: int
    dim: int
    stage: Stage = Stage.CHECK_IN
    deadline: float = 0.0
    indices: dict[str, int] = field(default_factory=dict)
    certificates: dict[int, bytes] = field(default_factory=dict)
    identity_keys: dict[int, bytes] = field(default_factory=dict)
    accepted: dict[Stage, dict[str, bytes]] = field(default_factory=dict)
    results: dict[Stage, Mapping[int, Message]] = field(default_factory=dict)
    unusable: set[tuple[Stage, str]] = field(default_factory=set)  # stored messages not replayed
    arrivals: dict[int, float] = field(default_factory=dict)  # client index -> when its message came
    stragglers: set[int] = field(default_factory=set)  # client indices penalised for the rest of the round
    budget_end: float = math.inf
    params: SecAggParams | None = None
    server: SecAggServer | None = None
    graph: NeighbourGraph | None = None

    def eligible(self) -> frozenset[int]:
        return self.server.eligible() if self.server is not None else frozenset()


@dataclass(frozen=True)
class _Outcome:
    stage: Stage
    model_version: str
    detail: str
    participants: frozenset[str]


class RoundCoordinator:
    """Runs secure-aggregation rounds in sequence and answers the service's questions about them.

    All state lives on the event loop's thread: the service calls :meth:`join`, :meth:`submit`,
    :meth:`view` and :meth:`stage_result` from coroutines on the same loop that runs :meth:`run`, and asks
    :attr:`is_leader` first (a standby's answers would be about no round at all).

    Args:
        storage: durable round and device records.
        registry: the model registry (central ``v`` versions).
        settings: round parameters.
        clock: seconds since the epoch (a seam for tests; production uses :func:`time.time`).
        lease: the cohort's coordinator lease (default: a new one with a fresh replica id and this clock).
    """

    def __init__(
        self,
        *,
        storage: Storage,
        registry: ModelRegistry,
        settings: RoundSettings,
        clock: Callable[[], float] = time.time,
        lease: LeaderLease | None = None,
    ) -> None:
        if not isinstance(settings, RoundSettings):
            raise ValidationError("settings must be RoundSettings")
        self._storage = storage
        self._registry = registry
        self._settings = settings
        self._clock = clock
        self.lease = lease if lease is not None else LeaderLease(storage, cohort=settings.cohort, clock=clock)
        if self.lease.name != f"coordinator/{settings.cohort}":
            raise ValidationError("the lease must be the one of the settings' cohort")
        self._leading = False
        self._listeners: list[LeadershipListener] = []
        self._round: _Round | None = None
        self._resumable: _Round | None = None
        self._recovered = False
        self._outcomes: dict[int, _Outcome] = {}
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopped = False
        self._hand_over = False
        self._unrecorded_abort: _Round | None = None  # aborted while storage refused the write
        self.finished_rounds = 0
        self.aborted_rounds = 0

    @property
    def settings(self) -> RoundSettings:
        """The round parameters."""
        return self._settings

    @property
    def storage(self) -> Storage:
        """The storage the coordinator writes to."""
        return self._storage

    # -- life cycle ---------------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True while this replica coordinates: it holds the lease and has recovered the interrupted round."""
        return self._leading and self.lease.held

    def on_leadership(self, listener: LeadershipListener) -> None:
        """Call ``listener(True)`` when this replica starts leading and ``listener(False)`` when it stops."""
        self._listeners.append(listener)

    async def _announce(self, leading: bool) -> None:
        self._leading = leading
        for listener in self._listeners:
            await listener(leading)

    def stop(self, *, hand_over: bool = False) -> None:
        """Ask :meth:`run` (or :meth:`serve`) to return.

        Args:
            hand_over: leave a round in progress to the next leader (a standby, or this deployment's next
                process) instead of aborting it: the next leader resumes it, or aborts it if it was still in
                check-in. Follow with :meth:`release` so a standby need not wait for the lease to expire.
        """
        self._hand_over = hand_over
        self._stopped = True
        self._wake.set()

    def _check_stopped(self) -> None:
        if self._stopped:
            raise _HandedOver("stopping") if self._hand_over else RoundAbortedError("stopping")

    def release(self) -> None:
        """Stop leading and give the lease up, so a standby takes over at once (call after :meth:`stop`)."""
        self._leading = False
        self.lease.release()

    def recover(self) -> list[int]:
        """Take the lease and deal with the round a previous leader left active: resume it if its protocol
        state was persisted, else abort it (nothing is published for an aborted round). :meth:`run` calls it
        once it holds the lease; a test may call it directly.

        Before resuming, the round's version is bumped, so a previous leader that has not noticed it lost
        the lease can no longer change the round.

        Returns:
            The ids of the rounds aborted.

        Raises:
            NotLeaderError: another replica holds the lease.
        """
        # A storage failure is not a lost lease: while the lease secured earlier is still ours, we lead.
        if not self.lease.try_acquire() and not self.lease.held:
            raise NotLeaderError("another replica holds the coordinator lease")
        aborted = []
        for _ in range(20):  # each retry means a stale leader wrote meanwhile; it stops within its TTL
            record = self._storage.active_round(self._settings.cohort)
            if record is None:
                break
            try:
                if self._resumable is None and record.state:
                    try:
                        rnd = self._restore(record)
                    except (FedferError, ValueError, KeyError, TypeError) as exc:
                        _log.warning("round %d cannot be resumed (%s)", record.round_id, type(exc).__name__)
                    else:
                        rnd.version = self._storage.update_round(
                            record.round_id, expected_version=record.version, now=self._now()
                        ).version
                        self._resumable = self._round = rnd
                        _log.warning(
                            "round %d was interrupted (restart or takeover): resuming in stage %s",
                            record.round_id,
                            rnd.stage.key,
                        )
                        break
                self._storage.update_round(
                    record.round_id,
                    expected_version=record.version,
                    now=self._now(),
                    status=Stage.ABORTED,
                )
            except ConflictError:
                continue
            aborted.append(record.round_id)
            _log.warning("round %d was interrupted: aborted, nothing published", record.round_id)
        self._recovered = True
        self._leading = True
        return aborted

    async def run(self) -> None:
        """Wait for the lease, then run rounds until :meth:`stop` is called or ``settings.rounds`` finished.

        A round interrupted by a restart or a dead leader is resumed first when its state was persisted,
        else aborted.

        Raises:
            LeadershipLostError: the lease was lost (the round in progress is left for the next leader).
        """
        if not await self._await_lease():
            return
        try:
            while not self._recovered:
                with self._storage_trouble("recovering the interrupted round"):
                    self.recover()
                if not self._recovered:
                    await self._sleep(1.0)
            await self._announce(True)
            waiting = False  # for a model to be published (logged once per wait)
            while not self._stopped and (
                self._settings.rounds == 0 or self.finished_rounds < self._settings.rounds
            ):
                with self._storage_trouble("starting a round"):
                    if self._unrecorded_abort is not None:
                        self._record_abort(self._unrecorded_abort)
                        continue
                    if self._resumable is not None:
                        rnd, self._resumable = self._resumable, None
                        await self._drive(rnd, self._registry.get(rnd.base_version).arrays, resume=True)
                        continue
                    base = self._storage.latest_model_version()
                    if base is not None:
                        waiting = False
                        await self._run_round(base)
                        continue
                    if not waiting:
                        waiting = True
                        _log.warning(NO_MODEL_MESSAGE)
                await self._sleep(0.5)
        except LeaseExpiredError:
            _log.error("the coordinator lease ran out while storage was unavailable: standing by")
            await self._announce(False)
            raise
        except (LeadershipLostError, NotLeaderError):
            _log.error("lost the coordinator lease: stepping down, the round is left to the next leader")
            await self._announce(False)
            raise LeadershipLostError("lost the coordinator lease") from None

    @contextlib.contextmanager
    def _storage_trouble(self, what: str) -> Iterator[None]:
        """Log and swallow a storage failure that retrying later can cure (a full disk): the caller waits and
        tries again, as the leader it still is; it neither exits nor reports the lease lost."""
        try:
            yield
        except StorageUnavailableError as exc:
            _log.warning("%s: %s; retrying", what, exc)

    def _record_abort(self, rnd: _Round) -> None:
        """Write the ABORTED status of a round whose abort storage refused earlier (before any new round)."""
        try:
            self._storage.update_round(
                rnd.round_id, expected_version=rnd.version, now=self._now(), status=Stage.ABORTED
            )
        except StorageUnavailableError:
            raise
        except FedferError:
            pass  # changed meanwhile (another leader): nothing left to record
        _log.info("round %d: abort recorded", rnd.round_id)
        self._unrecorded_abort = None

    async def serve(self) -> None:
        """:meth:`run`, then keep the lease until :meth:`stop`, answering about the finished rounds.

        A lease that ran out only because storage refused the renewals (:class:`LeaseExpiredError`) makes this
        replica a standby in the same process: it waits for storage and the lease and then resumes the round
        from storage, like any new leader. Losing the lease to another replica raises.
        """
        while True:
            try:
                await self.run()
                while not self._stopped:
                    await self._sleep(self.lease.renew_s)
                return
            except LeaseExpiredError:
                self._recovered = False
                self._resumable = None
                if self._leading:
                    await self._announce(False)
                if self._stopped:
                    return
            except LeadershipLostError:
                await self._announce(False)
                raise

    async def _await_lease(self) -> bool:
        """Wait as a standby until this replica holds the lease; False if stopped first."""
        while not self._stopped:
            if (self._recovered and self.lease.held) or self.lease.try_acquire():
                return True
            await self._sleep(self.lease.retry_s, renew=False)
        return False

    async def _run_round(self, base: int) -> None:
        model = self._registry.get(base)
        dim = model.num_parameters
        params = {"base_version": base, "dim": dim}
        try:
            record = self._storage.create_round(params=params, now=self._now(), cohort=self._settings.cohort)
        except ConflictError:
            # A round we do not know is active: a previous leader raced us. If we still lead, treat it as an
            # interrupted round (resume or abort it); recover() raises NotLeaderError if we do not.
            _log.warning("another coordinator's round is active; recovering it")
            self.recover()
            return
        rnd = _Round(round_id=record.round_id, version=record.version, base_version=base, dim=dim)
        rnd.accepted = {s: {} for s in COLLECTING}
        _log.info("round %d open for check-in on model version %d (dim %d)", rnd.round_id, base, dim)
        await self._drive(rnd, model.arrays, resume=False)

    async def _drive(self, rnd: _Round, base: Mapping[str, npt.NDArray[np.float32]], *, resume: bool) -> None:
        """Take ``rnd`` from its current stage to publication (or abort)."""
        self._round = rnd
        self._notify()
        try:
            if not resume:
                await self._check_in(rnd)
            for stage in COLLECTING[COLLECTING.index(rnd.stage) :]:
                await self._collect(rnd, stage)
            result = rnd.server.result() if rnd.server is not None else None
            if result is None:  # pragma: no cover - _collect always builds the server
                raise RoundAbortedError("no result")
            version = await self._publish(rnd, base, result)
            self.finished_rounds += 1
            _log.info(
                "round %d published model version %d from %d devices (total weight %d, error bound %.3g)",
                rnd.round_id,
                version,
                len(result.survivors),
                result.total_weight,
                result.error_bound,
            )
        except (LeadershipLostError, ConflictError) as exc:
            # Another replica leads now (or changed the round under us): leave the round to it, untouched.
            _log.warning("round %d: no longer the coordinator (%s)", rnd.round_id, type(exc).__name__)
            if isinstance(exc, LeaseExpiredError):
                raise
            raise LeadershipLostError("lost the coordinator lease") from None
        except _HandedOver:
            _log.warning("round %d left in stage %s for the next leader", rnd.round_id, rnd.stage.key)
        except MisbehaviourError as exc:
            names = ", ".join(self._device_ids(rnd, exc.culprits))
            _log.warning(
                "round %d: devices %s dealt shares that do not reconstruct what they committed to",
                rnd.round_id,
                names,
            )
            self._abort(rnd, "a device's shares failed verification", exc)
        except InvalidAggregateError as exc:
            _log.warning("round %d: %s", rnd.round_id, exc)
            self._abort(rnd, "the aggregate failed validation", exc)
        except _BudgetSpent as exc:
            self._abort(rnd, "round time budget exhausted", exc)
        except StorageUnavailableError as exc:
            self._abort(rnd, "aggregator storage unavailable", exc)
        except RoundAbortedError as exc:
            self._abort(rnd, "aggregator stopping" if self._stopped else "too few surviving devices", exc)
        except FedferError as exc:
            self._abort(rnd, "round failed", exc)
        except Exception as exc:  # a bug must not take the service down: abort this round, log, go on
            _log.exception("round %d failed unexpectedly", rnd.round_id)
            self._abort(rnd, "round failed", exc)
        finally:
            self._round = None
            self._notify()

    async def _check_in(self, rnd: _Round) -> None:
        s = self._settings
        while True:
            self._check_stopped()
            joined = len(rnd.indices)
            if joined >= s.max_clients:
                break
            if joined >= s.min_clients:
                if rnd.deadline == 0.0:
                    rnd.deadline = self._clock() + s.checkin_s
                    self._notify()
                if self._clock() >= rnd.deadline:
                    break
            await self._sleep(rnd.deadline - self._clock() if rnd.deadline else 1.0)
        n = len(rnd.indices)
        k = s.neighbors_for(n)
        rnd.params = SecAggParams.create(
            round_id=os.urandom(32),
            num_clients=n,
            dim=rnd.dim,
            neighbors=k,
            threshold=s.threshold_for(n, k),
            clip=float(s.clip),
            max_weight=s.max_weight,
            modulus_bits=s.modulus_bits,
        )
        rnd.server = SecAggServer(params=rnd.params, identity_keys=rnd.identity_keys)
        rnd.graph = rnd.server.graph
        rnd.budget_end = self._clock() + s.budget_s
        await self._enter(rnd, Stage.ADVERTISE_KEYS)
        _log.info("round %d: %d devices, degree %d, threshold %d", rnd.round_id, n, k, rnd.params.threshold)

    async def _collect(self, rnd: _Round, stage: Stage) -> None:
        server = rnd.server
        if server is None:  # pragma: no cover - built at check-in
            raise RoundAbortedError("no protocol server")
        if self._clock() >= rnd.budget_end:
            raise _BudgetSpent("the round's time budget ran out")
        self._replay_stored(rnd, stage)
        while not server.all_received() and self._clock() < self._closes_at(rnd, server):
            self._check_stopped()
            await self._sleep(self._closes_at(rnd, server) - self._clock())
            self._replay_stored(rnd, stage)
        self._mark_stragglers(rnd, stage, server)
        dropped = len(server.pending())
        if dropped:
            _log.info("round %d %s: %d devices dropped out", rnd.round_id, stage.key, dropped)
        rnd.results[stage] = server.close_stage()
        await self._enter(rnd, _following(stage))

    def _closes_at(self, rnd: _Round, server: SecAggServer) -> float:
        """When the current stage closes: its deadline, or, once only stragglers are missing, the grace
        after the last prompt device's message (whichever comes first)."""
        pending = server.pending()
        if pending and pending <= rnd.stragglers:
            prompt = [t for i, t in rnd.arrivals.items() if i not in rnd.stragglers]
            if prompt:
                return min(rnd.deadline, max(prompt) + self._settings.straggler_grace_s)
        return rnd.deadline

    def _mark_stragglers(self, rnd: _Round, stage: Stage, server: SecAggServer) -> None:
        """Penalise the devices whose message came more than the grace after half of this stage's messages."""
        grace = self._settings.straggler_grace_s
        late_ones = rnd.stragglers & server.pending()
        if late_ones and self._clock() < rnd.deadline:
            _log.info(
                "round %d %s: %d stragglers dropped at the grace", rnd.round_id, stage.key, len(late_ones)
            )
        times = sorted(rnd.arrivals.values())
        if len(times) < 2:
            return
        half = times[(len(times) - 1) // 2]
        late = {i for i, t in rnd.arrivals.items() if t > half + grace} - rnd.stragglers
        if late:
            _log.info(
                "round %d %s: %d devices answered more than %.1f s after half of the others: stragglers for "
                "the rest of the round",
                rnd.round_id,
                stage.key,
                len(late),
                grace,
            )
            rnd.stragglers |= late

    async def _enter(self, rnd: _Round, stage: Stage) -> None:
        if stage is not Stage.FINISHED:
            state = self._persisted_state(rnd, stage)
            window = self._settings.deadline_s(stage)
            updated = await self._until_stored(
                lambda: self._storage.update_round(
                    rnd.round_id,
                    expected_version=rnd.version,
                    now=self._now(),
                    status=stage,
                    state=state,
                ),
                what=f"round {rnd.round_id}: entering {stage.key}",
                until=self._clock() + window,
            )
            rnd.version = updated.version
            rnd.deadline = min(self._clock() + window, rnd.budget_end)
            rnd.arrivals = {}
        rnd.stage = stage
        self._notify()

    async def _until_stored(self, write: Callable[[], T], *, what: str, until: float) -> T:
        """Run a storage write; while storage refuses it for now (a full disk), retry until ``until``."""
        warned = False
        while True:
            try:
                return write()
            except StorageUnavailableError as exc:
                if self._clock() >= until or self._stopped:
                    raise
                if not warned:
                    _log.warning("%s: %s; retrying until it is back", what, exc)
                    warned = True
                await self._sleep(_STORAGE_RETRY_S)

    @staticmethod
    def _device_ids(rnd: _Round, indices: tuple[int, ...]) -> list[str]:
        by_index = {i: d for d, i in rnd.indices.items()}
        return [by_index.get(i, f"index {i}") for i in indices]

    # -- persistence across restarts --------------------------------------------------------------------

    def _persisted_state(self, rnd: _Round, stage: Stage) -> bytes:
        """What a restarted aggregator needs to resume ``rnd`` at the start of ``stage``.

        Only what the aggregator may see anyway: public parameters, the device/index map, device certificates
        and identity public keys, and the protocol server's snapshot (signed public keys, routed ciphertexts,
        the masked running sum, revealed shares). Messages accepted during the stage are stored one by one
        (:meth:`submit`) and replayed on resume.
        """
        if rnd.server is None or rnd.params is None:
            return b""
        doc = {
            "format": _STATE_FORMAT,
            "stage": stage.key,
            "base_version": rnd.base_version,
            "dim": rnd.dim,
            "indices": rnd.indices,
            "certificates": {str(i): _b64(c) for i, c in rnd.certificates.items()},
            "identity_keys": {str(i): _b64(k) for i, k in rnd.identity_keys.items()},
            "snapshot": _b64(rnd.server.snapshot()),
        }
        return json.dumps(doc, sort_keys=True).encode()

    def _restore(self, record: RoundRecord) -> _Round:
        """Rebuild an interrupted round from its persisted state (raises if it cannot be trusted)."""
        doc = json.loads(record.state)
        if doc["format"] != _STATE_FORMAT:
            raise ValidationError("unknown round state format")
        stage = Stage.from_key(doc["stage"])
        if stage not in COLLECTING or record.status is not stage:
            raise ValidationError("round state does not match the round's status")
        identity_keys = {int(i): _unb64(k) for i, k in doc["identity_keys"].items()}
        server = SecAggServer.restore(_unb64(doc["snapshot"]), identity_keys=identity_keys)
        if server.stage is not stage:
            raise ValidationError("protocol snapshot is in another stage")
        indices = {str(d): int(i) for d, i in doc["indices"].items()}
        rnd = _Round(
            round_id=record.round_id,
            version=record.version,
            base_version=int(doc["base_version"]),
            dim=int(doc["dim"]),
            stage=stage,
            deadline=self._clock() + self._settings.deadline_s(stage),
            indices=indices,
            certificates={int(i): _unb64(c) for i, c in doc["certificates"].items()},
            identity_keys=identity_keys,
            params=server.params,
            server=server,
            graph=server.graph,
            budget_end=self._clock() + self._settings.budget_s,
        )
        rnd.accepted = {s: {} for s in COLLECTING}
        # A device eligible now completed every earlier stage. Digests are compared only within the current
        # stage (an earlier stage's message is refused as out of stage), so these need none.
        survivors = [d for d, i in indices.items() if i in server.eligible()]
        for earlier in COLLECTING[: COLLECTING.index(stage)]:
            rnd.accepted[earlier] = dict.fromkeys(survivors, b"")
        previous = COLLECTING[COLLECTING.index(stage) - 1] if stage is not Stage.ADVERTISE_KEYS else None
        if previous is not None:
            rnd.results[previous] = {i: server.message_for(i) for i in server.eligible()}
        self._replay_stored(rnd, stage)
        return rnd

    def _replay_stored(self, rnd: _Round, stage: Stage) -> None:
        """Feed the protocol server the messages of ``stage`` that storage holds but it has not seen.

        Empty in the normal flow. After a restart or takeover these are the messages accepted (and
        acknowledged) before it, so devices need not send them again; while collecting, they are messages a
        previous leader accepted after this one took over and before it noticed it had lost the lease.
        Only the senders are read unless some are missing, so calling this once per second is cheap.
        """
        server = rnd.server
        if server is None:
            return
        status = stage
        missing = [
            d
            for d in self._storage.round_message_senders(rnd.round_id, stage=status)
            if d in rnd.indices and d not in rnd.accepted[stage] and (stage, d) not in rnd.unusable
        ]
        if not missing:
            return
        for device_id, payload in sorted(
            self._storage.round_messages(rnd.round_id, stage=status, device_ids=missing).items()
        ):
            try:
                message = STAGE_MESSAGE[stage].from_bytes(payload)
                if message.sender != rnd.indices[device_id] or message.sender not in server.eligible():
                    raise NotParticipantError("stored message of a device that is not eligible")
                server.receive(message)
            except (ProtocolError, ValidationError) as exc:
                rnd.unusable.add((stage, device_id))
                _log.warning(
                    "round %d: stored %s message not replayed (%s)",
                    rnd.round_id,
                    stage.key,
                    type(exc).__name__,
                )
                continue
            rnd.accepted[stage][device_id] = hashlib.sha256(payload).digest()
            rnd.arrivals[message.sender] = self._clock()

    async def _publish(
        self,
        rnd: _Round,
        base: Mapping[str, npt.NDArray[np.float32]],
        result: AggregateResult,
    ) -> int:
        if result.flagged:
            _log.warning(
                "round %d: devices %s revealed keys that do not open what they were dealt; refused, and the "
                "round completed without what they revealed",
                rnd.round_id,
                ", ".join(self._device_ids(rnd, result.flagged)),
            )
        mean = result.mean()
        participants = sorted(self._device_ids(rnd, result.survivors))
        arrays: dict[str, npt.NDArray[np.float32]] = {}
        offset = 0
        for name in sorted(base):
            current = base[name]
            delta = mean[offset : offset + current.size].reshape(current.shape)
            arrays[name] = (current.astype(np.float64) + delta).astype(np.float32)
            offset += current.size
        latest = self._storage.latest_model_version() or 0
        model = self._registry.prepare(
            latest + 1, arrays, parent=rnd.base_version, origin=f"round:{rnd.round_id}"
        )
        # The model and the round's PUBLISHED status commit together: a crash leaves either both or neither,
        # so a resumed round can never publish a second version.
        await self._until_stored(
            lambda: self._storage.publish_round(
                rnd.round_id,
                expected_version=rnd.version,
                now=self._now(),
                model=model,
                participants=participants,
            ),
            what=f"round {rnd.round_id}: publishing",
            until=self._clock() + self._settings.unmask_s,
        )
        version = model.version
        self._outcomes[rnd.round_id] = _Outcome(Stage.FINISHED, str(version), "", frozenset(participants))
        return version

    def _abort(self, rnd: _Round, detail: str, exc: BaseException) -> None:
        _log.warning("round %d aborted: %s (%s)", rnd.round_id, detail, type(exc).__name__)
        self.aborted_rounds += 1
        try:
            self._storage.update_round(
                rnd.round_id, expected_version=rnd.version, now=self._now(), status=Stage.ABORTED
            )
        except StorageUnavailableError:
            _log.warning("round %d: abort not recorded yet (storage unavailable)", rnd.round_id)
            self._unrecorded_abort = rnd
        except FedferError:
            pass
        self._outcomes[rnd.round_id] = _Outcome(Stage.ABORTED, "", detail, frozenset(rnd.indices))

    # -- requests from devices ----------------------------------------------------------------------------

    def join(self, *, device_id: str, round_id: int, certificate_pem: bytes) -> RoundView:
        """Admit ``device_id`` to the round during check-in (idempotent) and return its view.

        Raises:
            StaleRoundError: ``round_id`` is not the current round.
            StageError: check-in is closed.
        """
        rnd = self._current(round_id)
        if device_id not in rnd.indices:
            if rnd.stage is not Stage.CHECK_IN:
                raise StageError("check-in is closed")
            if len(rnd.indices) < self._settings.max_clients:
                record = self._storage.get_device(device_id)
                if record is None or record.revoked:
                    raise NotParticipantError("device is not in good standing")
                index = len(rnd.indices) + 1
                rnd.indices[device_id] = index
                rnd.certificates[index] = certificate_pem
                rnd.identity_keys[index] = record.identity_public_key
                self._wake.set()
        return self.view(device_id)

    def view(self, device_id: str, *, known_round_id: int = 0, known_stage: Stage | None = None) -> RoundView:
        """The round as ``device_id`` sees it: ``known_round_id`` if that is over, else the current round.

        A caller that already knows how round ``known_round_id`` ended (``known_stage`` is its outcome) gets
        the current round instead, so a long poll that watched one round through to its end moves on to the
        next one rather than being told the same outcome again.
        """
        latest = self._latest_version_text()
        rnd = self._round
        if known_round_id and (rnd is None or rnd.round_id != known_round_id):
            past = self._past_view(device_id, known_round_id, latest)
            if known_stage is None or past.stage is not known_stage:
                return past
        if rnd is None:
            return RoundView(round_id=0, stage=Stage.IDLE, latest_model_version=latest)
        index = rnd.indices.get(device_id, 0)
        participant = index > 0 and (rnd.stage is Stage.CHECK_IN or index in rnd.eligible())
        return RoundView(
            round_id=rnd.round_id,
            stage=rnd.stage,
            model_version=str(rnd.base_version),
            dim=rnd.dim,
            deadline_unix_ms=int(rnd.deadline * 1000),
            participant=participant,
            client_index=index,
            completed=tuple(s for s in COLLECTING if device_id in rnd.accepted[s]),
            parameters=rnd.params.to_bytes() if rnd.params is not None else b"",
            latest_model_version=latest,
        )

    def _past_view(self, device_id: str, round_id: int, latest: str) -> RoundView:
        outcome = self._outcomes.get(round_id)
        if outcome is None:
            record = self._storage.get_round(round_id)
            if record is None or record.cohort != self._settings.cohort or not record.status.terminal:
                raise StaleRoundError("unknown round")
            finished = record.status is Stage.FINISHED
            outcome = _Outcome(
                Stage.FINISHED if finished else Stage.ABORTED,
                str(record.model_version) if finished and record.model_version is not None else "",
                "" if finished else "round aborted",
                frozenset(record.participants),
            )
        return RoundView(
            round_id=round_id,
            stage=outcome.stage,
            model_version=outcome.model_version,
            participant=device_id in outcome.participants,
            latest_model_version=latest,
            detail=outcome.detail,
        )

    async def wait_for_change(self, *, round_id: int, stage: Stage, timeout_s: float) -> None:
        """Return once the current (round, stage) is not (``round_id``, ``stage``), or at the timeout."""
        deadline = self._clock() + timeout_s
        while True:
            rnd = self._round
            current = (rnd.round_id, rnd.stage) if rnd is not None else (0, Stage.IDLE)
            remaining = deadline - self._clock()
            if current != (round_id, stage) or remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)

    def submit(self, *, device_id: str, round_id: int, stage: Stage, payload: bytes) -> bool:
        """Accept one device's message for one protocol stage of the current round.

        A repeat of an accepted message is accepted again (harmless); anything else out of place raises and
        changes nothing.

        Returns:
            True when the message was accepted now, False for a repeat of the accepted one.

        Raises:
            StaleRoundError: ``round_id`` is not the current round.
            RoundAbortedError: ``round_id`` names a round that aborted.
            StageError: the round is in another stage.
            NotParticipantError: the device is not eligible in this stage, or names another sender.
            DuplicateSubmissionError: a different message of this device was accepted in this stage.
            ValidationError, ProtocolError, IntegrityError: the protocol layer refused the message (a
                :class:`~fedfer.security.secagg.server.ShareVerificationError` is logged with the device's
                id).
            StorageUnavailableError: accepted, but not stored yet (a full disk): the device's retry stores it.
        """
        rnd = self._current(round_id)
        if rnd.stage is not stage or rnd.server is None:
            raise StageError("wrong stage")
        index = rnd.indices.get(device_id, 0)
        if index == 0 or index not in rnd.server.eligible():
            raise NotParticipantError("not a participant of this stage")
        digest = hashlib.sha256(payload).digest()
        previous = rnd.accepted[stage].get(device_id)
        if previous is not None:
            if previous != digest:
                raise DuplicateSubmissionError("different message already accepted")
            # A retry: make sure the message is stored (the first attempt may have failed right there).
            self._storage.put_round_message(
                round_id,
                stage=stage,
                device_id=device_id,
                payload=payload,
                now=self._now(),
            )
            return False
        message = STAGE_MESSAGE[stage].from_bytes(payload)
        if message.sender != index:
            raise NotParticipantError("message names another sender")
        try:
            rnd.server.receive(message)
        except ShareVerificationError:
            _log.warning(
                "round %d: device %s revealed a key that does not open the share it was dealt: refused",
                round_id,
                device_id,
            )
            # Waiting for it to send an honest answer instead is waiting at most the straggler grace.
            rnd.stragglers.add(index)
            if rnd.server.pending() <= rnd.stragglers:
                self._wake.set()
            raise
        rnd.accepted[stage][device_id] = digest
        rnd.arrivals[index] = self._clock()
        if rnd.server.all_received() or rnd.server.pending() <= rnd.stragglers:
            self._wake.set()
        self._storage.put_round_message(
            round_id, stage=stage, device_id=device_id, payload=payload, now=self._now()
        )
        return True

    def stage_result(self, *, device_id: str, round_id: int, stage: Stage) -> tuple[bytes, dict[int, bytes]]:
        """What the aggregator sent ``device_id`` when ``stage`` closed, and (check-in) peer certificates.

        Raises:
            StaleRoundError: not the current round.
            StageError: the stage has not closed yet.
            NotParticipantError: the device has no result in that stage.
        """
        rnd = self._current(round_id)
        index = rnd.indices.get(device_id, 0)
        if stage is Stage.CHECK_IN:
            if rnd.graph is None:
                raise StageError("check-in has not closed")
            if index == 0:
                raise NotParticipantError("device did not check in")
            holders = rnd.graph.holders(index)
            return b"", {i: rnd.certificates[i] for i in sorted(holders)}
        results = rnd.results.get(stage)
        if results is None:
            raise StageError("stage has not closed")
        message = results.get(index)
        if message is None:
            raise NotParticipantError("no result for this device")
        return message.to_bytes(), {}

    def check_round(self, round_id: int) -> None:
        """Make sure ``round_id`` is the current round.

        Raises:
            StaleRoundError: it is not (finished, unknown, or an earlier round).
            RoundAbortedError: it names a round that aborted.
        """
        self._current(round_id)

    # -- helpers ------------------------------------------------------------------------------------------

    def _current(self, round_id: int) -> _Round:
        rnd = self._round
        if rnd is None or rnd.round_id != round_id:
            outcome = self._outcomes.get(round_id)
            if outcome is None and 0 < round_id <= 2**63 - 1:
                record = self._storage.get_round(round_id)
                if record is not None and record.status is Stage.ABORTED:
                    raise RoundAbortedError("round aborted")
            if outcome is not None and outcome.stage is Stage.ABORTED:
                raise RoundAbortedError("round aborted")
            raise StaleRoundError("not the current round")
        return rnd

    def _latest_version_text(self) -> str:
        latest = self._storage.latest_model_version()
        return "" if latest is None else str(latest)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _sleep(self, seconds: float, *, renew: bool = True) -> None:
        """Wait up to ``seconds`` (at most one) or until woken; then, while leading, renew the lease if due.

        Every waiting loop of a leader goes through here, which is what keeps the lease renewed.

        Raises:
            LeadershipLostError: the lease was lost.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.01, min(seconds, 1.0)))
        self._wake.clear()
        if renew:
            self.lease.keep()

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)
