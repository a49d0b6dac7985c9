"""The round coordinator without a network: real storage, real registry, real secure-aggregation clients.

A controllable clock drives the deadlines, so stragglers, duplicates, stale rounds and restarts are tested
exactly; the published model is checked against the plaintext oracle.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfer.aggregator.enrollment import EnrollmentService, issue_token
from fedfer.aggregator.leader import LeadershipLostError
from fedfer.aggregator.registry import ModelRegistry
from fedfer.aggregator.rounds import (
    DuplicateSubmissionError,
    NotLeaderError,
    NotParticipantError,
    RoundCoordinator,
    RoundSettings,
    StageError,
    StaleRoundError,
)
from fedfer.aggregator.storage import Storage, open_storage
from fedfer.aggregator.storage.sqlite import SqliteStorage
from fedfer.security import pki
from fedfer.security.errors import ProtocolError, RoundAbortedError
from fedfer.security.keys import IdentityKey
from fedfer.security.secagg import Stage
from fedfer.security.secagg.client import SecAggClient
from fedfer.security.secagg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    KeysBroadcast,
    SharesBroadcast,
    UnmaskRequest,
)
from fedfer.security.secagg.params import SecAggParams

DIM = 50
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Dev:
    device_id: str
    cert: bytes
    identity: IdentityKey
    ca_pem: bytes


@pytest.fixture
def storage(tmp_path: Path) -> Any:
    with open_storage(f"sqlite://{tmp_path / 'agg.db'}", create=True) as s:
        yield s


def make_devices(storage: Storage, count: int) -> list[Dev]:
    ca = pki.CertificateAuthority.create(common_name="ca", now=NOW, validity=dt.timedelta(days=10))
    service = EnrollmentService(storage=storage, ca=ca, clock=lambda: NOW)
    devices = []
    for i in range(count):
        tls, identity = pki.TlsPrivateKey.generate(), IdentityKey.generate()
        csr = pki.create_device_csr(device_id=f"dev-{i:03d}", tls_key=tls, identity_key=identity)
        token = issue_token(storage, now=NOW).token
        result = service.enroll(token=token, csr_pem=csr)
        devices.append(Dev(result.device.device_id, result.certificate_pem, identity, ca.certificate_pem))
    return devices


def coordinator_for(storage: Storage, clock: Clock, **overrides: Any) -> RoundCoordinator:
    registry = ModelRegistry(storage)
    if storage.latest_model_version() is None:
        registry.publish(
            1, {"w": np.linspace(-1, 1, DIM, dtype=np.float32)}, parent=None, origin="random:seed=0"
        )
    settings = RoundSettings(**{"min_clients": 3, "max_clients": 5, "degree": 0, "rounds": 1, **overrides})
    return RoundCoordinator(storage=storage, registry=registry, settings=settings, clock=clock)


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=60))


def client_for(coord: RoundCoordinator, dev: Dev, round_id: int) -> SecAggClient:
    view = coord.view(dev.device_id)
    params = SecAggParams.from_bytes(view.parameters)
    _, certs = coord.stage_result(device_id=dev.device_id, round_id=round_id, stage=Stage.CHECK_IN)
    keys = {
        i: pki.verify_device_certificate(pem, ca_certificate_pem=dev.ca_pem, now=NOW).identity_public_key
        for i, pem in certs.items()
    }
    return SecAggClient(
        params=params,
        client_id=view.client_index,
        identity_key=dev.identity,
        identity_keys=keys,
    )


def test_deadline_turns_straggler_into_dropout_and_mean_matches_oracle(storage: Storage) -> None:
    clock = Clock()
    devices = make_devices(storage, 4)
    rng = np.random.default_rng(5)
    updates = {d.device_id: rng.normal(0, 0.4, DIM) for d in devices}
    weights = {d.device_id: i + 2 for i, d in enumerate(devices)}

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=4)
        task = asyncio.create_task(coord.run())
        await until(lambda: coord.view(devices[0].device_id).stage is Stage.CHECK_IN, "check-in")
        round_id = coord.view(devices[0].device_id).round_id
        for d in devices:
            coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
        await until(lambda: coord.view(devices[0].device_id).stage is Stage.ADVERTISE_KEYS, "advertise")
        clients = {d.device_id: client_for(coord, d, round_id) for d in devices}
        straggler = devices[3]
        for d in devices[:3]:
            coord.submit(
                device_id=d.device_id,
                round_id=round_id,
                stage=Stage.ADVERTISE_KEYS,
                payload=clients[d.device_id].advertise_keys().to_bytes(),
            )
        await asyncio.sleep(0.2)
        assert coord.view(devices[0].device_id).stage is Stage.ADVERTISE_KEYS  # waits for the straggler
        clock.t += coord.settings.advertise_s + 1
        await until(lambda: coord.view(devices[0].device_id).stage is Stage.SHARE_KEYS, "share keys")
        assert not coord.view(straggler.device_id).participant
        with pytest.raises(NotParticipantError):
            coord.submit(
                device_id=straggler.device_id,
                round_id=round_id,
                stage=Stage.SHARE_KEYS,
                payload=b"\x00",
            )
        alive = devices[:3]
        for stage, follow in (
            (Stage.ADVERTISE_KEYS, Stage.MASKED_INPUT),
            (Stage.SHARE_KEYS, Stage.CONSISTENCY_CHECK),
            (Stage.MASKED_INPUT, Stage.UNMASK),
            (Stage.CONSISTENCY_CHECK, Stage.FINISHED),
        ):
            for d in alive:
                payload, _ = coord.stage_result(device_id=d.device_id, round_id=round_id, stage=stage)
                c = clients[d.device_id]
                msg: Any
                if stage is Stage.ADVERTISE_KEYS:
                    msg = c.share_keys(KeysBroadcast.from_bytes(payload))
                elif stage is Stage.SHARE_KEYS:
                    msg = c.masked_input(
                        SharesBroadcast.from_bytes(payload),
                        update=updates[d.device_id],
                        weight=weights[d.device_id],
                    )
                elif stage is Stage.MASKED_INPUT:
                    msg = c.consistency_check(ConsistencyRequest.from_bytes(payload))
                else:
                    msg = c.unmask(UnmaskRequest.from_bytes(payload))
                submit_stage = {
                    Stage.ADVERTISE_KEYS: Stage.SHARE_KEYS,
                    Stage.SHARE_KEYS: Stage.MASKED_INPUT,
                    Stage.MASKED_INPUT: Stage.CONSISTENCY_CHECK,
                    Stage.CONSISTENCY_CHECK: Stage.UNMASK,
                }[stage]
                coord.submit(
                    device_id=d.device_id, round_id=round_id, stage=submit_stage, payload=msg.to_bytes()
                )
            if follow is not Stage.FINISHED:
                await until(lambda f=follow: coord.view(alive[0].device_id).stage is f, follow.key)  # type: ignore[misc]
        await asyncio.wait_for(task, timeout=20)
        final = coord.view(alive[0].device_id, known_round_id=round_id)
        assert final.stage is Stage.FINISHED and final.model_version == "2"
        record = storage.get_round(round_id)
        assert record is not None and record.status is Stage.FINISHED
        assert list(record.participants) == sorted(d.device_id for d in alive)
        registry = ModelRegistry(storage)
        assert (registry.get(2).origin, registry.get(2).parent) == (f"round:{round_id}", 1)
        got = registry.get(2).arrays["w"].astype(np.float64) - registry.get(1).arrays["w"].astype(np.float64)
        total = sum(weights[d.device_id] for d in alive)
        oracle = sum(weights[d.device_id] * np.clip(updates[d.device_id], -1, 1) for d in alive) / total
        assert np.max(np.abs(got - oracle)) < 1e-5

    run(body)


def test_out_of_place_messages_are_refused_without_changing_state(storage: Storage) -> None:
    clock = Clock()
    devices = make_devices(storage, 4)

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=3)
        task = asyncio.create_task(coord.run())
        await until(lambda: coord.view(devices[0].device_id).stage is Stage.CHECK_IN, "check-in")
        round_id = coord.view(devices[0].device_id).round_id
        with pytest.raises(StaleRoundError):
            coord.join(device_id=devices[0].device_id, round_id=round_id + 1, certificate_pem=devices[0].cert)
        for d in devices[:3]:
            coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
        await until(lambda: coord.view(devices[0].device_id).stage is Stage.ADVERTISE_KEYS, "advertise")
        late = devices[3]
        with pytest.raises(StageError):
            coord.join(device_id=late.device_id, round_id=round_id, certificate_pem=late.cert)
        clients = [client_for(coord, d, round_id) for d in devices[:3]]
        first = clients[0].advertise_keys().to_bytes()
        a, b = devices[0].device_id, devices[1].device_id
        with pytest.raises(StageError):
            coord.submit(device_id=a, round_id=round_id, stage=Stage.SHARE_KEYS, payload=first)
        with pytest.raises(NotParticipantError):  # b sending a's message: it names another sender
            coord.submit(device_id=b, round_id=round_id, stage=Stage.ADVERTISE_KEYS, payload=first)
        with pytest.raises(NotParticipantError):
            coord.submit(
                device_id=late.device_id, round_id=round_id, stage=Stage.ADVERTISE_KEYS, payload=first
            )
        coord.submit(device_id=a, round_id=round_id, stage=Stage.ADVERTISE_KEYS, payload=first)
        coord.submit(device_id=a, round_id=round_id, stage=Stage.ADVERTISE_KEYS, payload=first)  # a retry
        params = SecAggParams.from_bytes(coord.view(a).parameters)
        other = AdvertiseKeys(params.round_id, 1, b"\x01" * 32, b"\x02" * 32, b"\x04" * 32, b"\x03" * 64)
        with pytest.raises(DuplicateSubmissionError):
            coord.submit(device_id=a, round_id=round_id, stage=Stage.ADVERTISE_KEYS, payload=other.to_bytes())
        assert coord.view(a).completed == (Stage.ADVERTISE_KEYS,)
        assert coord.view(b).completed == ()
        # Stop mid-round: the round is aborted and nothing is published.
        coord.stop()
        await asyncio.wait_for(task, timeout=10)
        record = storage.get_round(round_id)
        assert record is not None and record.status is Stage.ABORTED
        assert storage.list_model_versions() == [1]
        with pytest.raises(RoundAbortedError):
            coord.submit(device_id=a, round_id=round_id, stage=Stage.ADVERTISE_KEYS, payload=first)

    run(body)


def test_check_in_waits_for_min_clients_and_restart_aborts_the_open_round(storage: Storage) -> None:
    clock = Clock()
    devices = make_devices(storage, 2)

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=5)
        task = asyncio.create_task(coord.run())
        await until(lambda: coord.view(devices[0].device_id).stage is Stage.CHECK_IN, "check-in")
        round_id = coord.view(devices[0].device_id).round_id
        for d in devices:
            coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
        clock.t += 3600  # far past every deadline: still waiting, nobody has committed anything
        await asyncio.sleep(1.2)
        assert coord.view(devices[0].device_id).stage is Stage.CHECK_IN
        task.cancel()  # the process dies without cleaning up
        with pytest.raises(asyncio.CancelledError):
            await task
        active = storage.active_round()
        assert active is not None and active.round_id == round_id
        restarted = coordinator_for(storage, clock)
        # The dead process still holds the lease until it expires: the new one waits and touches nothing.
        with pytest.raises(NotLeaderError):
            restarted.recover()
        assert storage.active_round() == active
        clock.t += coord.lease.ttl_s
        assert restarted.recover() == [round_id]
        assert storage.active_round() is None
        view = restarted.view(devices[0].device_id, known_round_id=round_id)
        assert view.stage is Stage.ABORTED and view.detail == "round aborted"

    run(body)


def test_settings_are_validated() -> None:
    from fedfer.security.errors import ValidationError

    for bad in (
        {"min_clients": 1},
        {"min_clients": 5, "max_clients": 4},
        {"threshold": 1},
        {"threshold": 0.4},
        {"degree": 3},
        {"masked_s": 0},
        {"min_clients": True},
    ):
        with pytest.raises(ValidationError):
            RoundSettings(**bad)
    s = RoundSettings(degree=-1, threshold=None)
    assert s.neighbors_for(100) == 20 and s.threshold_for(100, 20) == 11
    assert RoundSettings(degree=0).neighbors_for(10) == 9
    assert RoundSettings(threshold=0.75).threshold_for(10, 9) == 8


def test_aggregator_never_imports_torch_or_the_agent() -> None:
    code = (
        "import sys, fedfer.aggregator.cli, fedfer.aggregator.server, fedfer.aggregator.service, "
        "fedfer.aggregator.rounds; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'fedfer.agent'))]; "
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_restart_resumes_a_persisted_round_and_aborts_a_corrupt_one(storage: Storage) -> None:
    clock = Clock()
    devices = make_devices(storage, 3)

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=3)
        task = asyncio.create_task(coord.run())
        await until(lambda: coord.view(devices[0].device_id).stage is Stage.CHECK_IN, "check-in")
        round_id = coord.view(devices[0].device_id).round_id
        for d in devices:
            coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
        await until(lambda: coord.view(devices[0].device_id).stage is Stage.ADVERTISE_KEYS, "advertise")
        clients = [client_for(coord, d, round_id) for d in devices]
        for d, c in zip(devices[:2], clients[:2], strict=True):
            payload = c.advertise_keys().to_bytes()
            coord.submit(
                device_id=d.device_id, round_id=round_id, stage=Stage.ADVERTISE_KEYS, payload=payload
            )
        task.cancel()  # the process dies
        with pytest.raises(asyncio.CancelledError):
            await task

        resumed = coordinator_for(storage, clock, min_clients=3, max_clients=3)
        clock.t += coord.lease.ttl_s  # the dead process's lease runs out
        assert resumed.recover() == []
        views = [resumed.view(d.device_id) for d in devices]
        assert all(v.round_id == round_id and v.stage is Stage.ADVERTISE_KEYS for v in views)
        assert [v.completed for v in views] == [
            (Stage.ADVERTISE_KEYS,),
            (Stage.ADVERTISE_KEYS,),
            (),
        ]
        # The third device's advertisement completes the stage on the resumed aggregator.
        run_task = asyncio.create_task(resumed.run())
        payload = clients[2].advertise_keys().to_bytes()
        resumed.submit(
            device_id=devices[2].device_id,
            round_id=round_id,
            stage=Stage.ADVERTISE_KEYS,
            payload=payload,
        )
        await until(lambda: resumed.view(devices[0].device_id).stage is Stage.SHARE_KEYS, "share keys")
        broadcast, _ = resumed.stage_result(
            device_id=devices[0].device_id, round_id=round_id, stage=Stage.ADVERTISE_KEYS
        )
        assert len(KeysBroadcast.from_bytes(broadcast).entries) == 3
        run_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run_task

        record = storage.active_round()
        assert record is not None and record.state
        storage.update_round(record.round_id, expected_version=record.version, now=NOW, state=b"{corrupt")
        again = coordinator_for(storage, clock)
        clock.t += resumed.lease.ttl_s
        assert again.recover() == [round_id]
        final = storage.get_round(round_id)
        assert final is not None and final.status is Stage.ABORTED
        assert storage.list_model_versions() == [1]

    run(body)


_BUILT_FROM = {  # the stage result a device needs to build its message for a stage
    Stage.SHARE_KEYS: Stage.ADVERTISE_KEYS,
    Stage.MASKED_INPUT: Stage.SHARE_KEYS,
    Stage.CONSISTENCY_CHECK: Stage.MASKED_INPUT,
    Stage.UNMASK: Stage.CONSISTENCY_CHECK,
}
PROTOCOL_STAGES = (Stage.ADVERTISE_KEYS, *_BUILT_FROM)


def _message(
    coord: RoundCoordinator, dev: Dev, client: SecAggClient, round_id: int, stage: Stage, update: Any
) -> bytes:
    """What ``dev`` sends in ``stage``, built from what the coordinator gave it when the previous closed."""
    if stage is Stage.ADVERTISE_KEYS:
        return client.advertise_keys().to_bytes()
    payload, _ = coord.stage_result(device_id=dev.device_id, round_id=round_id, stage=_BUILT_FROM[stage])
    msg: Any
    if stage is Stage.SHARE_KEYS:
        msg = client.share_keys(KeysBroadcast.from_bytes(payload))
    elif stage is Stage.MASKED_INPUT:
        msg = client.masked_input(SharesBroadcast.from_bytes(payload), update=update[0], weight=update[1])
    elif stage is Stage.CONSISTENCY_CHECK:
        msg = client.consistency_check(ConsistencyRequest.from_bytes(payload))
    else:
        msg = client.unmask(UnmaskRequest.from_bytes(payload))
    return msg.to_bytes()


async def _finish_round(
    coord: RoundCoordinator,
    devices: list[Dev],
    clients: dict[str, SecAggClient],
    round_id: int,
    *,
    updates: dict[str, tuple[Any, int]] | None = None,
    stages: tuple[Stage, ...] = PROTOCOL_STAGES,
) -> dict[Stage, dict[str, bytes]]:
    """Drive the devices through ``stages``: once the coordinator is in a stage, every device that has not
    completed it sends its message. Returns what each device sent, by stage."""
    sent: dict[Stage, dict[str, bytes]] = {}
    for stage in stages:
        await until(lambda s=stage: coord.view(devices[0].device_id).stage is s, stage.key)  # type: ignore[misc]
        for d in devices:
            if stage in coord.view(d.device_id).completed:
                continue
            update = (updates or {}).get(d.device_id, (np.full(DIM, 0.1), 1))
            payload = _message(coord, d, clients[d.device_id], round_id, stage, update)
            coord.submit(device_id=d.device_id, round_id=round_id, stage=stage, payload=payload)
            sent.setdefault(stage, {})[d.device_id] = payload
    return sent


async def _complete_round(coord: RoundCoordinator, devices: list[Dev], round_id: int) -> dict[str, bytes]:
    """Drive every device through one round; return each device's advertise payload."""
    clients = {d.device_id: client_for(coord, d, round_id) for d in devices}
    return (await _finish_round(coord, devices, clients, round_id))[Stage.ADVERTISE_KEYS]


def test_messages_replayed_from_an_earlier_round_are_refused(storage: Storage) -> None:
    clock = Clock()
    devices = make_devices(storage, 3)

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=3, rounds=2)
        task = asyncio.create_task(coord.run())
        old: dict[str, bytes] = {}
        for expected_round in (1, 2):
            await until(lambda: coord.view(devices[0].device_id).stage is Stage.CHECK_IN, "check-in")
            round_id = coord.view(devices[0].device_id).round_id
            assert round_id == expected_round
            for d in devices:
                coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
            await until(lambda: coord.view(devices[0].device_id).stage is Stage.ADVERTISE_KEYS, "advertise")
            if expected_round == 1:
                old = await _complete_round(coord, devices, round_id)
                continue
            a = devices[0].device_id
            # Round 1's message under round 1's id: that round is over.
            with pytest.raises(StaleRoundError):
                coord.submit(device_id=a, round_id=1, stage=Stage.ADVERTISE_KEYS, payload=old[a])
            # Round 1's message relabelled with the current round id: bound to the old protocol round.
            with pytest.raises(ProtocolError) as info:
                coord.submit(device_id=a, round_id=round_id, stage=Stage.ADVERTISE_KEYS, payload=old[a])
            assert not isinstance(info.value, StageError | StaleRoundError | DuplicateSubmissionError)
            assert coord.view(a).completed == ()
            await _complete_round(coord, devices, round_id)
        await asyncio.wait_for(task, timeout=20)
        assert storage.list_model_versions() == [1, 2, 3]

    run(body)


def test_a_poll_that_knows_how_a_round_ended_is_told_about_the_next_round(storage: Storage) -> None:
    """A device that watched round 1 to its end and polls with (1, FINISHED) learns of round 2.

    Before, the answer was round 1's outcome again, for ever: a device whose last poll of round 1 still saw it
    running kept being told that round 1 finished and never saw round 2's check-in (a CI hang).
    """
    clock = Clock()
    devices = make_devices(storage, 3)

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=3, rounds=2)
        task = asyncio.create_task(coord.run())
        first = await _open_and_join(coord, devices)
        await _complete_round(coord, devices, first)
        await until(lambda: coord.view(devices[0].device_id).round_id != first, "the next round")
        a = devices[0].device_id
        # Still in the dark about round 1's end: told its outcome.
        told = coord.view(a, known_round_id=first, known_stage=Stage.UNMASK)
        assert (told.round_id, told.stage, told.model_version) == (first, Stage.FINISHED, "2")
        # Knowing the outcome: told about the current round, whichever it is.
        now = coord.view(a, known_round_id=first, known_stage=Stage.FINISHED)
        assert (now.round_id, now.stage) == (first + 1, Stage.CHECK_IN)
        # The wrong outcome is no knowledge: the caller is told the real one.
        wrong = coord.view(a, known_round_id=first, known_stage=Stage.ABORTED)
        assert (wrong.round_id, wrong.stage) == (first, Stage.FINISHED)
        await coord.wait_for_change(round_id=first, stage=Stage.FINISHED, timeout_s=5)  # returns at once
        second = await _open_and_join(coord, devices)
        assert second == first + 1
        await _complete_round(coord, devices, second)
        await asyncio.wait_for(task, timeout=20)
        idle = coord.view(a, known_round_id=second, known_stage=Stage.FINISHED)
        assert (idle.round_id, idle.stage) == (0, Stage.IDLE)

    run(body)


async def _open_and_join(coord: RoundCoordinator, devices: list[Dev]) -> int:
    """Wait for check-in, let every device join, wait for key advertisement; return the round id."""
    await until(lambda: coord.view(devices[0].device_id).stage is Stage.CHECK_IN, "check-in")
    round_id = coord.view(devices[0].device_id).round_id
    for d in devices:
        coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
    await until(lambda: coord.view(devices[0].device_id).stage is Stage.ADVERTISE_KEYS, "advertise")
    return round_id


async def _to_share_keys(coord: RoundCoordinator, devices: list[Dev]) -> tuple[int, dict[str, SecAggClient]]:
    """Open a round, let every device join and advertise keys; return once it shares keys."""
    round_id = await _open_and_join(coord, devices)
    clients = {d.device_id: client_for(coord, d, round_id) for d in devices}
    await _finish_round(coord, devices, clients, round_id, stages=(Stage.ADVERTISE_KEYS,))
    await until(lambda: coord.view(devices[0].device_id).stage is Stage.SHARE_KEYS, "share keys")
    return round_id, clients


def _assert_published(
    storage: Storage, round_id: int, version: int, updates: dict[str, tuple[Any, int]]
) -> None:
    """The round published ``version`` (the newest) from exactly these devices, and nothing more."""
    record = storage.get_round(round_id)
    assert record is not None and (record.status, record.model_version) == (Stage.FINISHED, version)
    assert list(record.participants) == sorted(updates)
    assert storage.list_model_versions() == list(range(1, version + 1))
    _assert_mean(storage, version, updates)


def _assert_mean(storage: Storage, version: int, updates: dict[str, tuple[Any, int]]) -> None:
    """Model ``version`` minus its parent is the plaintext FedAvg of the clipped updates."""
    registry = ModelRegistry(storage)
    model = registry.get(version)
    assert model.parent is not None
    got = model.arrays["w"].astype(np.float64) - registry.get(model.parent).arrays["w"].astype(np.float64)
    total = sum(w for _, w in updates.values())
    oracle = sum(w * np.clip(u, -1, 1) for u, w in updates.values()) / total
    assert np.max(np.abs(got - oracle)) < 1e-5


class _Crash(BaseException):
    """The process dies at this point: nothing in it can handle this (not an ``Exception``)."""


class _CrashingCursor:
    """Passes statements through; raises :class:`_Crash` at the round update that follows a model insert."""

    def __init__(self, cur: Any, owner: CrashingStorage) -> None:
        self._cur = cur
        self._owner = owner
        self._model_written = False

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)

    def execute(self, sql: str, params: Any = (), /) -> Any:
        if sql.startswith("INSERT INTO models"):
            self._model_written = True
        elif self._model_written and self._owner.crash_in_publication and sql.startswith("UPDATE rounds"):
            raise _Crash
        return self._cur.execute(sql, params)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> Any:
        return self._cur.fetchall()


class CrashingStorage(SqliteStorage):
    """SQLite storage whose process can die inside the publication, after the model row was written and
    before the round is marked published (the two steps that once were two transactions)."""

    crash_in_publication = False

    @contextlib.contextmanager
    def _begin(self, *, write: bool) -> Iterator[Any]:
        with super()._begin(write=write) as cur:
            yield _CrashingCursor(cur, self)


def test_a_crash_inside_publication_publishes_the_round_exactly_once_after_restart(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "agg.db"
    crashing = CrashingStorage(path, now=NOW, create=True)
    devices = make_devices(crashing, 3)
    rng = np.random.default_rng(9)
    updates = {d.device_id: (rng.normal(0, 0.6, DIM), i + 2) for i, d in enumerate(devices)}
    ids = sorted(updates)

    async def body() -> None:
        coord = coordinator_for(crashing, clock, min_clients=3, max_clients=3, rounds=2)
        task = asyncio.create_task(coord.run())
        round_id = await _open_and_join(coord, devices)
        clients = {d.device_id: client_for(coord, d, round_id) for d in devices}
        crashing.crash_in_publication = True
        await _finish_round(coord, devices, clients, round_id, updates=updates)
        with pytest.raises(_Crash):
            await asyncio.wait_for(task, timeout=20)
        # The transaction rolled back: no model version 2, the round still unmasking, its messages stored.
        record = crashing.get_round(round_id)
        assert record is not None and record.status is Stage.UNMASK and record.model_version is None
        assert crashing.list_model_versions() == [1]
        assert crashing.round_message_senders(round_id, stage=Stage.UNMASK) == set(ids)
        crashing.close()

        with open_storage(f"sqlite://{path}") as storage:  # the restarted process
            clock.t += coord.lease.ttl_s  # the dead process's lease runs out
            restarted = coordinator_for(storage, clock, min_clients=3, max_clients=3, rounds=2)
            assert restarted.recover() == []
            view = restarted.view(devices[0].device_id)
            assert (view.round_id, view.stage, view.completed) == (
                round_id,
                Stage.UNMASK,
                PROTOCOL_STAGES,
            )
            task = asyncio.create_task(restarted.run())
            # The stored unmasking shares complete the resumed stage: the round publishes once, as version 2,
            # and the next round opens.
            next_id = await _open_and_join(restarted, devices)
            _assert_published(storage, round_id, 2, updates)
            # The next round succeeds.
            clients = {d.device_id: client_for(restarted, d, next_id) for d in devices}
            await _finish_round(restarted, devices, clients, next_id, updates=updates)
            await asyncio.wait_for(task, timeout=20)
            _assert_published(storage, next_id, 3, updates)

    run(body)


def test_restart_during_share_keys_resumes_and_publishes_the_oracle_mean(storage: Storage) -> None:
    clock = Clock()
    devices = make_devices(storage, 3)
    rng = np.random.default_rng(10)
    updates = {d.device_id: (rng.normal(0, 0.6, DIM), i + 1) for i, d in enumerate(devices)}

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=3)
        task = asyncio.create_task(coord.run())
        round_id, clients = await _to_share_keys(coord, devices)
        for d in devices[:2]:
            payload = _message(coord, d, clients[d.device_id], round_id, Stage.SHARE_KEYS, None)
            coord.submit(device_id=d.device_id, round_id=round_id, stage=Stage.SHARE_KEYS, payload=payload)
        task.cancel()  # the process dies with two of three shares accepted (and stored)
        with pytest.raises(asyncio.CancelledError):
            await task

        clock.t += coord.lease.ttl_s
        resumed = coordinator_for(storage, clock, min_clients=3, max_clients=3)
        assert resumed.recover() == []
        done = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS)
        assert [resumed.view(d.device_id).completed for d in devices] == [done, done, done[:1]]
        assert resumed.view(devices[0].device_id).stage is Stage.SHARE_KEYS
        task = asyncio.create_task(resumed.run())
        await _finish_round(resumed, devices, clients, round_id, updates=updates, stages=PROTOCOL_STAGES[1:])
        await asyncio.wait_for(task, timeout=20)
        _assert_published(storage, round_id, 2, updates)

    run(body)


@dataclass
class Replicas:
    """Two coordinators over two connections to one database, three devices mid-way through a round."""

    a: RoundCoordinator
    b: RoundCoordinator
    store_a: Storage
    store_b: Storage
    task_a: asyncio.Task[None]
    task_b: asyncio.Task[None]
    devices: list[Dev]
    updates: dict[str, tuple[Any, int]]
    round_id: int = 0
    clients: dict[str, SecAggClient] = field(default_factory=dict)


def with_two_replicas(
    tmp_path: Path, clock_a: Clock, clock_b: Clock, body: Callable[[Replicas], Awaitable[None]]
) -> None:
    """Start replica ``a`` (it leads), then ``b`` (standby), take the devices' round to its key sharing,
    then run ``body``."""
    url = f"sqlite://{tmp_path / 'agg.db'}"
    rng = np.random.default_rng(12)

    async def main() -> None:
        with open_storage(url, create=True) as store_a, open_storage(url) as store_b:
            devices = make_devices(store_a, 3)
            updates = {d.device_id: (rng.normal(0, 0.6, DIM), i + 1) for i, d in enumerate(devices)}
            a = coordinator_for(store_a, clock_a, min_clients=3, max_clients=3)
            task_a = asyncio.create_task(a.run())
            await until(lambda: a.is_leader, "a leads")
            b = coordinator_for(store_b, clock_b, min_clients=3, max_clients=3)
            task_b = asyncio.create_task(b.run())
            r = Replicas(a, b, store_a, store_b, task_a, task_b, devices, updates)
            r.round_id, r.clients = await _to_share_keys(a, devices)
            await body(r)

    run(main)


def test_a_standby_never_touches_the_round_and_a_stale_leader_is_fenced_off(tmp_path: Path) -> None:
    clock_a, clock_b = Clock(), Clock()

    async def body(r: Replicas) -> None:
        a, b, devices, round_id = r.a, r.b, r.devices, r.round_id
        await asyncio.sleep(1.5)  # b asked for the lease more than once meanwhile
        lease = r.store_b.get_lease(b.lease.name)
        assert lease is not None and lease.owner == a.lease.owner != b.lease.owner
        assert not b.is_leader and b.view(devices[0].device_id).stage is Stage.IDLE
        active = r.store_b.active_round()
        assert active is not None and (active.round_id, active.status) == (round_id, Stage.SHARE_KEYS)

        # a's process hangs: its clock (and so its renewals) stop, while b's time passes the lease's expiry.
        clock_b.t += a.lease.ttl_s
        await until(lambda: b.is_leader, "b takes over")
        view = b.view(devices[0].device_id)
        assert (view.round_id, view.stage) == (round_id, Stage.SHARE_KEYS)
        # a has not noticed yet and accepts the devices' shares; closing the stage is its first round write,
        # which fails because b bumped the round's version when it took over: a steps down, aborting nothing.
        assert a.is_leader
        for d in devices:
            payload = _message(a, d, r.clients[d.device_id], round_id, Stage.SHARE_KEYS, None)
            a.submit(device_id=d.device_id, round_id=round_id, stage=Stage.SHARE_KEYS, payload=payload)
        with pytest.raises(LeadershipLostError):
            await asyncio.wait_for(r.task_a, timeout=10)
        assert not a.is_leader
        # b picks up the shares a stored and completes the round: published once, the oracle mean.
        await _finish_round(b, devices, r.clients, round_id, updates=r.updates, stages=PROTOCOL_STAGES[2:])
        await asyncio.wait_for(r.task_b, timeout=20)
        _assert_published(r.store_b, round_id, 2, r.updates)

    with_two_replicas(tmp_path, clock_a, clock_b, body)


def test_a_clean_shutdown_hands_the_round_over_to_the_standby(tmp_path: Path) -> None:
    clock = Clock()

    async def body(r: Replicas) -> None:
        # SIGTERM on the leader: it stops without aborting the round and gives the lease up.
        r.a.stop(hand_over=True)
        await asyncio.wait_for(r.task_a, timeout=10)
        r.a.release()
        assert r.store_a.get_lease(r.a.lease.name) is None
        record = r.store_a.active_round()
        assert record is not None and (record.round_id, record.status) == (r.round_id, Stage.SHARE_KEYS)
        # The standby takes over at once (no expiry to wait for: the clock does not move) and resumes it.
        await until(lambda: r.b.is_leader, "b takes over")
        assert r.b.view(r.devices[0].device_id).round_id == r.round_id
        await _finish_round(
            r.b, r.devices, r.clients, r.round_id, updates=r.updates, stages=PROTOCOL_STAGES[1:]
        )
        await asyncio.wait_for(r.task_b, timeout=20)
        _assert_published(r.store_b, r.round_id, 2, r.updates)

    with_two_replicas(tmp_path, clock, clock, body)


def test_a_round_opened_behind_the_leaders_back_is_recovered_not_raised(storage: Storage) -> None:
    clock = Clock()
    registry = ModelRegistry(storage)
    settings = RoundSettings(min_clients=3, max_clients=3, degree=0, rounds=1)
    coord = RoundCoordinator(storage=storage, registry=registry, settings=settings, clock=clock)

    async def body() -> None:
        task = asyncio.create_task(coord.run())
        await until(lambda: coord.is_leader, "the coordinator leads")  # no model yet: it waits for one
        stray = storage.create_round(params={}, now=NOW)  # what a stale leader could still do
        registry.publish(1, {"w": np.zeros(DIM, dtype=np.float32)}, parent=None, origin="random:seed=0")
        # Its own create_round loses to the stray round: it recovers that one (aborting it: nothing persisted)
        # and opens its own, instead of crashing out of run().
        await until(lambda: coord.view("dev-x").stage is Stage.CHECK_IN, "its own round")
        assert coord.view("dev-x").round_id != stray.round_id
        record = storage.get_round(stray.round_id)
        assert record is not None and record.status is Stage.ABORTED
        assert not task.done()
        coord.stop()
        await asyncio.wait_for(task, timeout=10)

    run(body)
