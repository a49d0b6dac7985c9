"""The round coordinator without a network: real storage, real registry, real secure-aggregation clients.

A controllable clock drives the deadlines, so stragglers, duplicates, stale rounds and restarts are tested
exactly; the published model is checked against the plaintext oracle.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.enrollment import EnrollmentService, issue_token
from aggregator.registry import ModelRegistry
from aggregator.rounds import (
    DuplicateSubmissionError,
    NotParticipantError,
    RoundCoordinator,
    RoundSettings,
    RoundStage,
    StageError,
    StaleRoundError,
)
from aggregator.storage import RoundStatus, Storage, open_storage
from security import pki
from security.errors import ProtocolError, RoundAbortedError
from security.secagg.client import SecAggClient
from security.secagg.messages import AdvertiseKeys, KeysBroadcast, SharesBroadcast, UnmaskRequest
from security.secagg.params import SecAggParams

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
    identity: pki.IdentityKey
    ca_pem: bytes


@pytest.fixture
def storage(tmp_path: Path) -> Any:
    with open_storage(f"sqlite://{tmp_path / 'agg.db'}") as s:
        yield s


def make_devices(storage: Storage, count: int) -> list[Dev]:
    ca = pki.CertificateAuthority.create(common_name="ca", now=NOW, validity=dt.timedelta(days=10))
    service = EnrollmentService(storage=storage, ca=ca, clock=lambda: NOW)
    devices = []
    for i in range(count):
        tls, identity = pki.TlsPrivateKey.generate(), pki.IdentityKey.generate()
        csr = pki.create_device_csr(device_id=f"dev-{i:03d}", tls_key=tls, identity_key=identity)
        token = issue_token(storage, now=NOW).token
        result = service.enroll(token=token, csr_pem=csr)
        devices.append(Dev(result.device.device_id, result.certificate_pem, identity, ca.certificate_pem))
    return devices


def coordinator_for(storage: Storage, clock: Clock, **overrides: Any) -> RoundCoordinator:
    registry = ModelRegistry(storage)
    if storage.latest_model_version() is None:
        registry.publish(1, {"w": np.linspace(-1, 1, DIM, dtype=np.float32)}, parent=None)
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
    _, certs = coord.stage_result(device_id=dev.device_id, round_id=round_id, stage=RoundStage.CHECK_IN)
    keys = {
        i: pki.verify_device_certificate(pem, ca_certificate_pem=dev.ca_pem, now=NOW).identity_public_key
        for i, pem in certs.items()
    }
    return SecAggClient(
        params=params,
        client_id=view.client_index,
        identity_key=dev.identity.to_signing_handle(),
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
        await until(lambda: coord.view(devices[0].device_id).stage is RoundStage.CHECK_IN, "check-in")
        round_id = coord.view(devices[0].device_id).round_id
        for d in devices:
            coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
        await until(lambda: coord.view(devices[0].device_id).stage is RoundStage.ADVERTISE_KEYS, "advertise")
        clients = {d.device_id: client_for(coord, d, round_id) for d in devices}
        straggler = devices[3]
        for d in devices[:3]:
            coord.submit(
                device_id=d.device_id,
                round_id=round_id,
                stage=RoundStage.ADVERTISE_KEYS,
                payload=clients[d.device_id].advertise_keys().to_bytes(),
            )
        await asyncio.sleep(0.2)
        assert coord.view(devices[0].device_id).stage is RoundStage.ADVERTISE_KEYS  # waits for the straggler
        clock.t += coord.settings.advertise_s + 1
        await until(lambda: coord.view(devices[0].device_id).stage is RoundStage.SHARE_KEYS, "share keys")
        assert not coord.view(straggler.device_id).participant
        with pytest.raises(NotParticipantError):
            coord.submit(
                device_id=straggler.device_id,
                round_id=round_id,
                stage=RoundStage.SHARE_KEYS,
                payload=b"\x00",
            )
        alive = devices[:3]
        for stage, follow in (
            (RoundStage.ADVERTISE_KEYS, RoundStage.MASKED_INPUT),
            (RoundStage.SHARE_KEYS, RoundStage.UNMASK),
            (RoundStage.MASKED_INPUT, RoundStage.FINISHED),
        ):
            for d in alive:
                payload, _ = coord.stage_result(device_id=d.device_id, round_id=round_id, stage=stage)
                c = clients[d.device_id]
                msg: Any
                if stage is RoundStage.ADVERTISE_KEYS:
                    msg = c.share_keys(KeysBroadcast.from_bytes(payload))
                elif stage is RoundStage.SHARE_KEYS:
                    msg = c.masked_input(
                        SharesBroadcast.from_bytes(payload),
                        update=updates[d.device_id],
                        weight=weights[d.device_id],
                    )
                else:
                    msg = c.unmask(UnmaskRequest.from_bytes(payload))
                submit_stage = {
                    RoundStage.ADVERTISE_KEYS: RoundStage.SHARE_KEYS,
                    RoundStage.SHARE_KEYS: RoundStage.MASKED_INPUT,
                    RoundStage.MASKED_INPUT: RoundStage.UNMASK,
                }[stage]
                coord.submit(
                    device_id=d.device_id, round_id=round_id, stage=submit_stage, payload=msg.to_bytes()
                )
            if follow is not RoundStage.FINISHED:
                await until(lambda f=follow: coord.view(alive[0].device_id).stage is f, follow.value)  # type: ignore[misc]
        await asyncio.wait_for(task, timeout=20)
        final = coord.view(alive[0].device_id, known_round_id=round_id)
        assert final.stage is RoundStage.FINISHED and final.model_version == "2"
        record = storage.get_round(round_id)
        assert record is not None and record.status is RoundStatus.PUBLISHED
        assert list(record.participants) == sorted(d.device_id for d in alive)
        registry = ModelRegistry(storage)
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
        await until(lambda: coord.view(devices[0].device_id).stage is RoundStage.CHECK_IN, "check-in")
        round_id = coord.view(devices[0].device_id).round_id
        with pytest.raises(StaleRoundError):
            coord.join(device_id=devices[0].device_id, round_id=round_id + 1, certificate_pem=devices[0].cert)
        for d in devices[:3]:
            coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
        await until(lambda: coord.view(devices[0].device_id).stage is RoundStage.ADVERTISE_KEYS, "advertise")
        late = devices[3]
        with pytest.raises(StageError):
            coord.join(device_id=late.device_id, round_id=round_id, certificate_pem=late.cert)
        clients = [client_for(coord, d, round_id) for d in devices[:3]]
        first = clients[0].advertise_keys().to_bytes()
        a, b = devices[0].device_id, devices[1].device_id
        with pytest.raises(StageError):
            coord.submit(device_id=a, round_id=round_id, stage=RoundStage.SHARE_KEYS, payload=first)
        with pytest.raises(NotParticipantError):  # b sending a's message: it names another sender
            coord.submit(device_id=b, round_id=round_id, stage=RoundStage.ADVERTISE_KEYS, payload=first)
        with pytest.raises(NotParticipantError):
            coord.submit(
                device_id=late.device_id, round_id=round_id, stage=RoundStage.ADVERTISE_KEYS, payload=first
            )
        coord.submit(device_id=a, round_id=round_id, stage=RoundStage.ADVERTISE_KEYS, payload=first)
        coord.submit(
            device_id=a, round_id=round_id, stage=RoundStage.ADVERTISE_KEYS, payload=first
        )  # a retry
        params = SecAggParams.from_bytes(coord.view(a).parameters)
        other = AdvertiseKeys(params.round_id, 1, b"\x01" * 32, b"\x02" * 32, b"\x03" * 64)
        with pytest.raises(DuplicateSubmissionError):
            coord.submit(
                device_id=a, round_id=round_id, stage=RoundStage.ADVERTISE_KEYS, payload=other.to_bytes()
            )
        assert coord.view(a).completed == (RoundStage.ADVERTISE_KEYS,)
        assert coord.view(b).completed == ()
        # Stop mid-round: the round is aborted and nothing is published.
        coord.stop()
        await asyncio.wait_for(task, timeout=10)
        record = storage.get_round(round_id)
        assert record is not None and record.status is RoundStatus.ABORTED
        assert storage.list_model_versions() == [1]
        with pytest.raises(RoundAbortedError):
            coord.submit(device_id=a, round_id=round_id, stage=RoundStage.ADVERTISE_KEYS, payload=first)

    run(body)


def test_check_in_waits_for_min_clients_and_restart_aborts_the_open_round(storage: Storage) -> None:
    clock = Clock()
    devices = make_devices(storage, 2)

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=5)
        task = asyncio.create_task(coord.run())
        await until(lambda: coord.view(devices[0].device_id).stage is RoundStage.CHECK_IN, "check-in")
        round_id = coord.view(devices[0].device_id).round_id
        for d in devices:
            coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
        clock.t += 3600  # far past every deadline: still waiting, nobody has committed anything
        await asyncio.sleep(1.2)
        assert coord.view(devices[0].device_id).stage is RoundStage.CHECK_IN
        task.cancel()  # the process dies without cleaning up
        with pytest.raises(asyncio.CancelledError):
            await task
        active = storage.active_round()
        assert active is not None and active.round_id == round_id
        restarted = coordinator_for(storage, clock)
        assert restarted.recover() == [round_id]
        assert storage.active_round() is None
        view = restarted.view(devices[0].device_id, known_round_id=round_id)
        assert view.stage is RoundStage.ABORTED and view.detail == "round aborted"

    run(body)


def test_settings_are_validated() -> None:
    from security.errors import ValidationError

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
        "import sys, aggregator.cli, aggregator.server, aggregator.service, aggregator.rounds; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'agent'))]; "
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
        await until(lambda: coord.view(devices[0].device_id).stage is RoundStage.CHECK_IN, "check-in")
        round_id = coord.view(devices[0].device_id).round_id
        for d in devices:
            coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
        await until(lambda: coord.view(devices[0].device_id).stage is RoundStage.ADVERTISE_KEYS, "advertise")
        clients = [client_for(coord, d, round_id) for d in devices]
        for d, c in zip(devices[:2], clients[:2], strict=True):
            payload = c.advertise_keys().to_bytes()
            coord.submit(
                device_id=d.device_id, round_id=round_id, stage=RoundStage.ADVERTISE_KEYS, payload=payload
            )
        task.cancel()  # the process dies
        with pytest.raises(asyncio.CancelledError):
            await task

        resumed = coordinator_for(storage, clock, min_clients=3, max_clients=3)
        assert resumed.recover() == []
        views = [resumed.view(d.device_id) for d in devices]
        assert all(v.round_id == round_id and v.stage is RoundStage.ADVERTISE_KEYS for v in views)
        assert [v.completed for v in views] == [
            (RoundStage.ADVERTISE_KEYS,),
            (RoundStage.ADVERTISE_KEYS,),
            (),
        ]
        # The third device's advertisement completes the stage on the resumed aggregator.
        run_task = asyncio.create_task(resumed.run())
        payload = clients[2].advertise_keys().to_bytes()
        resumed.submit(
            device_id=devices[2].device_id,
            round_id=round_id,
            stage=RoundStage.ADVERTISE_KEYS,
            payload=payload,
        )
        await until(lambda: resumed.view(devices[0].device_id).stage is RoundStage.SHARE_KEYS, "share keys")
        broadcast, _ = resumed.stage_result(
            device_id=devices[0].device_id, round_id=round_id, stage=RoundStage.ADVERTISE_KEYS
        )
        assert len(KeysBroadcast.from_bytes(broadcast).entries) == 3
        run_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run_task

        record = storage.active_round()
        assert record is not None and record.state
        storage.update_round(record.round_id, expected_version=record.version, now=NOW, state=b"{corrupt")
        again = coordinator_for(storage, clock)
        assert again.recover() == [round_id]
        final = storage.get_round(round_id)
        assert final is not None and final.status is RoundStatus.ABORTED
        assert storage.list_model_versions() == [1]

    run(body)


async def _complete_round(coord: RoundCoordinator, devices: list[Dev], round_id: int) -> dict[str, bytes]:
    """Drive every device through one round; return each device's advertise payload."""
    clients = {d.device_id: client_for(coord, d, round_id) for d in devices}
    advertised = {}
    for d in devices:
        advertised[d.device_id] = clients[d.device_id].advertise_keys().to_bytes()
        coord.submit(
            device_id=d.device_id,
            round_id=round_id,
            stage=RoundStage.ADVERTISE_KEYS,
            payload=advertised[d.device_id],
        )
    steps = (
        (RoundStage.SHARE_KEYS, RoundStage.ADVERTISE_KEYS),
        (RoundStage.MASKED_INPUT, RoundStage.SHARE_KEYS),
        (RoundStage.UNMASK, RoundStage.MASKED_INPUT),
    )
    for stage, previous in steps:
        await until(lambda s=stage: coord.view(devices[0].device_id).stage is s, stage.value)  # type: ignore[misc]
        for d in devices:
            payload, _ = coord.stage_result(device_id=d.device_id, round_id=round_id, stage=previous)
            c = clients[d.device_id]
            msg: Any
            if stage is RoundStage.SHARE_KEYS:
                msg = c.share_keys(KeysBroadcast.from_bytes(payload))
            elif stage is RoundStage.MASKED_INPUT:
                msg = c.masked_input(SharesBroadcast.from_bytes(payload), update=np.full(DIM, 0.1), weight=1)
            else:
                msg = c.unmask(UnmaskRequest.from_bytes(payload))
            coord.submit(device_id=d.device_id, round_id=round_id, stage=stage, payload=msg.to_bytes())
    return advertised


def test_messages_replayed_from_an_earlier_round_are_refused(storage: Storage) -> None:
    clock = Clock()
    devices = make_devices(storage, 3)

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=3, rounds=2)
        task = asyncio.create_task(coord.run())
        old: dict[str, bytes] = {}
        for expected_round in (1, 2):
            await until(lambda: coord.view(devices[0].device_id).stage is RoundStage.CHECK_IN, "check-in")
            round_id = coord.view(devices[0].device_id).round_id
            assert round_id == expected_round
            for d in devices:
                coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
            await until(
                lambda: coord.view(devices[0].device_id).stage is RoundStage.ADVERTISE_KEYS, "advertise"
            )
            if expected_round == 1:
                old = await _complete_round(coord, devices, round_id)
                continue
            a = devices[0].device_id
            # Round 1's message under round 1's id: that round is over.
            with pytest.raises(StaleRoundError):
                coord.submit(device_id=a, round_id=1, stage=RoundStage.ADVERTISE_KEYS, payload=old[a])
            # Round 1's message relabelled with the current round id: bound to the old protocol round.
            with pytest.raises(ProtocolError) as info:
                coord.submit(device_id=a, round_id=round_id, stage=RoundStage.ADVERTISE_KEYS, payload=old[a])
            assert not isinstance(info.value, StageError | StaleRoundError | DuplicateSubmissionError)
            assert coord.view(a).completed == ()
            await _complete_round(coord, devices, round_id)
        await asyncio.wait_for(task, timeout=20)
        assert storage.list_model_versions() == [1, 2, 3]

    run(body)
