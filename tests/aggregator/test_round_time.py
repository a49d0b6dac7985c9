"""Time in a round: a device that answers late is penalised and then dropped; a round has a time budget.

The coordinator runs on a clock the test moves by hand (real storage, real secure-aggregation clients), so
"just before the deadline" is exact.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from fedfer.aggregator.rounds import RoundCoordinator, StageError
from fedfer.aggregator.storage import Storage
from fedfer.security.secagg.messages import ConsistencyRequest, KeysBroadcast, SharesBroadcast, UnmaskRequest
from fedfer.security.secagg.stage import Stage
from tests.aggregator.test_service_rounds import (
    DIM,
    Clock,
    Dev,
    client_for,
    coordinator_for,
    make_devices,
    run,
    storage,  # noqa: F401 - the fixture
    until,
)

_SUBMIT = {
    Stage.ADVERTISE_KEYS: Stage.SHARE_KEYS,
    Stage.SHARE_KEYS: Stage.MASKED_INPUT,
    Stage.MASKED_INPUT: Stage.CONSISTENCY_CHECK,
    Stage.CONSISTENCY_CHECK: Stage.UNMASK,
}


def _stage(coord: RoundCoordinator, dev: Dev) -> Stage:
    return coord.view(dev.device_id).stage


def _answer(coord: RoundCoordinator, clients: dict[str, Any], dev: Dev, round_id: int, stage: Stage) -> None:
    """Send ``dev``'s message for ``stage`` (computed from the previous stage's result)."""
    c = clients[dev.device_id]
    if stage is Stage.ADVERTISE_KEYS:
        msg = c.advertise_keys()
    else:
        previous = {v: k for k, v in _SUBMIT.items()}[stage]
        payload, _ = coord.stage_result(device_id=dev.device_id, round_id=round_id, stage=previous)
        if stage is Stage.SHARE_KEYS:
            msg = c.share_keys(KeysBroadcast.from_bytes(payload))
        elif stage is Stage.MASKED_INPUT:
            msg = c.masked_input(SharesBroadcast.from_bytes(payload), update=np.full(DIM, 0.25), weight=2)
        elif stage is Stage.CONSISTENCY_CHECK:
            msg = c.consistency_check(ConsistencyRequest.from_bytes(payload))
        else:
            msg = c.unmask(UnmaskRequest.from_bytes(payload))
    coord.submit(device_id=dev.device_id, round_id=round_id, stage=stage, payload=msg.to_bytes())


async def _open(coord: RoundCoordinator, devices: list[Dev]) -> tuple[int, dict[str, Any]]:
    await until(lambda: _stage(coord, devices[0]) is Stage.CHECK_IN, "check-in")
    round_id = coord.view(devices[0].device_id).round_id
    for d in devices:
        coord.join(device_id=d.device_id, round_id=round_id, certificate_pem=d.cert)
    await until(lambda: _stage(coord, devices[0]) is Stage.ADVERTISE_KEYS, "advertise keys")
    return round_id, {d.device_id: client_for(coord, d, round_id) for d in devices}


def test_a_device_answering_just_before_each_deadline_is_dropped_at_its_second_late_answer(
    storage: Storage,  # noqa: F811
) -> None:
    clock = Clock()
    devices = make_devices(storage, 4)
    late, prompt = devices[0], devices[1:]

    async def body() -> None:
        coord = coordinator_for(
            storage, clock, min_clients=4, max_clients=4, threshold=3, straggler_grace_s=1.0
        )
        s = coord.settings
        task = asyncio.create_task(coord.run())
        round_id, clients = await _open(coord, devices)
        start = clock.t
        # Stage 1: the three prompt devices answer at once, the late one just before the deadline.
        for d in prompt:
            _answer(coord, clients, d, round_id, Stage.ADVERTISE_KEYS)
        clock.t += s.advertise_s - 0.5
        await asyncio.sleep(0.3)
        assert _stage(coord, late) is Stage.ADVERTISE_KEYS  # the deadline still holds, once
        _answer(coord, clients, late, round_id, Stage.ADVERTISE_KEYS)
        await until(lambda: _stage(coord, late) is Stage.SHARE_KEYS, "share keys")
        # Stage 2: once the prompt ones answered, the late one gets the grace, not the deadline.
        for d in prompt:
            _answer(coord, clients, d, round_id, Stage.SHARE_KEYS)
        clock.t += s.straggler_grace_s + 0.1
        await until(lambda: _stage(coord, late) is Stage.MASKED_INPUT, "masked input")
        assert not coord.view(late.device_id).participant
        with pytest.raises(StageError):  # what it sends just before the deadline comes after the stage closed
            _answer(coord, clients, late, round_id, Stage.SHARE_KEYS)
        for stage in (Stage.MASKED_INPUT, Stage.CONSISTENCY_CHECK, Stage.UNMASK):
            for d in prompt:
                _answer(coord, clients, d, round_id, stage)
            if stage is not Stage.UNMASK:
                await until(lambda st=stage: _stage(coord, prompt[0]) is _SUBMIT[st], _SUBMIT[stage].key)  # type: ignore[misc]
        await asyncio.wait_for(task, timeout=20)
        record = storage.get_round(round_id)
        assert record is not None and record.status is Stage.FINISHED
        assert list(record.participants) == sorted(d.device_id for d in prompt)
        # Without the penalty the round would have taken five deadlines; it took one plus one grace.
        assert clock.t - start <= s.advertise_s + s.straggler_grace_s + 0.1

    run(body)


def test_equally_slow_devices_are_not_penalised(storage: Storage) -> None:  # noqa: F811
    clock = Clock()
    devices = make_devices(storage, 3)

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=3, straggler_grace_s=1.0)
        task = asyncio.create_task(coord.run())
        round_id, clients = await _open(coord, devices)
        for stage in (*_SUBMIT, Stage.UNMASK):
            for d in devices:
                clock.t += 0.9  # each answers 0.9 s after the previous one: spread, but nobody alone late
                _answer(coord, clients, d, round_id, stage)
            if stage is not Stage.UNMASK:
                await until(lambda st=stage: _stage(coord, devices[0]) is _SUBMIT[st], _SUBMIT[stage].key)  # type: ignore[misc]
        await asyncio.wait_for(task, timeout=20)
        record = storage.get_round(round_id)
        assert record is not None and record.status is Stage.FINISHED
        assert len(record.participants) == 3

    run(body)


def test_the_round_budget_caps_every_deadline_and_a_stage_after_it_aborts_the_round(
    storage: Storage,  # noqa: F811
) -> None:
    clock = Clock()
    devices = make_devices(storage, 3)

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=3, budget_s=25.0)
        s = coord.settings
        task = asyncio.create_task(coord.run())
        round_id, clients = await _open(coord, devices)
        budget_end = clock.t + s.budget_s
        for d in devices:
            _answer(coord, clients, d, round_id, Stage.ADVERTISE_KEYS)
        await until(lambda: _stage(coord, devices[0]) is Stage.SHARE_KEYS, "share keys")
        clock.t += 10.0  # the devices are slow: 10 s into the budget
        for d in devices:
            _answer(coord, clients, d, round_id, Stage.SHARE_KEYS)
        await until(lambda: _stage(coord, devices[0]) is Stage.MASKED_INPUT, "masked input")
        view = coord.view(devices[0].device_id)
        assert view.deadline_unix_ms == int(budget_end * 1000)  # masked_s (60 s) is cut to the budget's end
        for d in devices[:2]:
            _answer(coord, clients, d, round_id, Stage.MASKED_INPUT)
        clock.t = budget_end + 0.1  # the third never uploads: the stage closes at the budget's end ...
        await until(lambda: coord.aborted_rounds == 1, "the abort")
        coord.stop()
        await asyncio.wait_for(task, timeout=20)
        # ... with two survivors (t = 2), but no time is left for the consistency check: the round aborts.
        record = storage.get_round(round_id)
        assert record is not None and record.status is Stage.ABORTED
        past = coord.view(devices[0].device_id, known_round_id=round_id)
        assert past.detail == "round time budget exhausted"
        assert storage.list_model_versions() == [1]

    run(body)
