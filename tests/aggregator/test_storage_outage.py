"""The coordinator while its storage refuses every write (a full disk) for longer than its lease lasts.

A leader whose lease renewals fail only because storage is unavailable must stop leading when its lease runs
out, but it must not exit or claim another replica took over: it stands by in the same process and, once
storage is back, takes the lease again and resumes the round from storage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.aggregator.storage import StorageFullError
from fedfer.aggregator.storage.sqlite import SqliteStorage
from fedfer.security.secagg.stage import Stage
from tests.aggregator.test_service_rounds import (
    DIM,
    NOW,
    PROTOCOL_STAGES,
    Clock,
    _assert_published,
    _finish_round,
    _to_share_keys,
    coordinator_for,
    make_devices,
    run,
    until,
)


class FillableStorage(SqliteStorage):
    """SQLite storage whose writes fail as on a full disk while :attr:`full` is set."""

    full = False

    @contextlib.contextmanager
    def _begin(self, *, write: bool) -> Iterator[Any]:
        if write and self.full:
            raise StorageFullError("the disk holding the SQLite database is full; nothing was written")
        with super()._begin(write=write) as cur:
            yield cur


def test_a_lease_that_runs_out_on_a_full_disk_makes_a_standby_that_resumes_the_round_when_space_returns(
    tmp_path: Path,
) -> None:
    clock = Clock()
    storage = FillableStorage(tmp_path / "agg.db", now=NOW, create=True)
    devices = make_devices(storage, 3)
    updates: dict[str, tuple[Any, int]] = {
        d.device_id: (np.full(DIM, 0.05 * (i + 1)), i + 1) for i, d in enumerate(devices)
    }

    async def body() -> None:
        coord = coordinator_for(storage, clock, min_clients=3, max_clients=3, rounds=1)
        leading: list[bool] = []

        async def record(now_leading: bool) -> None:
            leading.append(now_leading)

        coord.on_leadership(record)
        task = asyncio.create_task(coord.serve())
        round_id, clients = await _to_share_keys(coord, devices)
        storage.full = True
        for _ in range(8):  # 24 s by the coordinator's clock: past the 15 s lease, renewals failing
            clock.t += 3.0
            await asyncio.sleep(0.3)
        await until(lambda: not coord.is_leader, "stepping down")
        assert not task.done()  # no exit, no LeadershipLostError
        assert leading[-1] is False
        storage.full = False
        await until(lambda: coord.is_leader, "leading again")
        # The round was resumed from storage in the stage it was in; the devices finish it.
        assert coord.view(devices[0].device_id).round_id == round_id
        assert coord.view(devices[0].device_id).stage is Stage.SHARE_KEYS
        await _finish_round(coord, devices, clients, round_id, updates=updates, stages=PROTOCOL_STAGES[1:])
        await until(lambda: coord.finished_rounds == 1, "publication")
        coord.stop()
        await asyncio.wait_for(task, timeout=20)
        _assert_published(storage, round_id, 2, updates)

    try:
        run(body)
    finally:
        storage.close()
