"""End-to-end federation with real processes: one ``fedfer-aggregator serve`` and ``fedfer-agent`` devices,
real gRPC over loopback TLS 1.3 with mutual TLS, real SQLite, real secure aggregation.

The published model is compared with a plaintext FedAvg oracle within the fixed-point codec's stated bound
(plus float32 rounding of the stored model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.integration.federation_harness import (
    Deployment,
    assert_published,
    free_port,
    random_updates,
    run_cli,
)

pytestmark = pytest.mark.slow


def test_eight_devices_complete_two_rounds(tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "agg", min_clients=8, max_clients=8, deadline_s=60)
    agg = dep.serve("--rounds", "2", "--checkin-s", "1")
    try:
        devices = dep.enroll_devices(8, agg.enroll_port, tmp_path)
        assert dep.device_ids() == sorted(d.device_id for d in devices)
        updates, weights = random_updates(devices, seed=1)
        for d in devices:
            d.start(updates[d.device_id], weights[d.device_id], rounds=2)
        results = {d.device_id: d.finish() for d in devices}
        fetched = tmp_path / "fetched.npz"
        out = run_cli("fedfer-agent", "fetch-model", "--state", str(devices[0].state), "--out", str(fetched))
        run_cli("fedfer-aggregator", "revoke", str(dep.dir), devices[0].device_id)
        with pytest.raises(RuntimeError, match="PERMISSION_DENIED: device is not authorized"):
            run_cli("fedfer-agent", "fetch-model", "--state", str(devices[0].state))
    finally:
        agg.kill()
    assert json.loads(out)["version"] == "3"
    with np.load(fetched) as data:
        for name, array in dep.model(3).items():
            np.testing.assert_array_equal(data[name], array)
    for device_id, (code, lines, err) in results.items():
        assert code == 0, f"{device_id}: {err[-1500:]}"
        assert [line["status"] for line in lines] == ["published", "published"]
        assert [line["model_version"] for line in lines] == ["2", "3"]
    status = dep.status()
    assert status["model_versions"] == [1, 2, 3]
    published = [r for r in status["rounds"] if r["status"] == "published"]
    assert [r["model_version"] for r in published] == [2, 3]
    for r in published:
        assert r["participants"] == sorted(updates)
    # The same deltas were applied in both rounds: v2 = v1 + mean, v3 = v2 + mean.
    assert_published(dep, 2, 1, updates, weights, n=8)
    assert_published(dep, 3, 2, updates, weights, n=8)
    assert "Traceback" not in agg.log()


def test_round_survives_devices_killed_after_share_keys_and_after_masked_input(tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "agg", min_clients=8, max_clients=8, deadline_s=8, complete_graph=True)
    agg = dep.serve("--rounds", "1", "--checkin-s", "1")
    try:
        devices = dep.enroll_devices(8, agg.enroll_port, tmp_path)
        updates, weights = random_updates(devices, seed=2)
        after_share, after_masked, *others = devices
        after_share.start(
            updates[after_share.device_id], weights[after_share.device_id], stall_after="share_keys"
        )
        after_masked.start(
            updates[after_masked.device_id], weights[after_masked.device_id], stall_after="masked_input"
        )
        for d in others:
            d.start(updates[d.device_id], weights[d.device_id])
        assert after_share.wait_for_line("stalled")["stalled"] == "share_keys"
        after_share.kill()
        assert after_masked.wait_for_line("stalled")["stalled"] == "masked_input"
        after_masked.kill()
        results = [d.finish() for d in others]
    finally:
        agg.kill()
    for code, lines, err in results:
        assert code == 0, err[-1500:]
        assert lines[-1]["status"] == "published"
    # The device killed after its masked input is in the sum (its self mask is rebuilt from shares);
    # the one killed after sharing keys is not (its pairwise masks are removed instead).
    used = {d: u for d, u in updates.items() if d != after_share.device_id}
    used_weights = {d: weights[d] for d in used}
    (round_record,) = dep.status()["rounds"][:1]
    assert round_record["status"] == "published"
    assert round_record["participants"] == sorted(used)
    assert_published(dep, 2, 1, used, used_weights, n=8)


def test_too_few_survivors_aborts_and_publishes_nothing(tmp_path: Path) -> None:
    dep = Deployment(
        tmp_path / "agg", min_clients=4, max_clients=4, deadline_s=6, threshold=3, complete_graph=True
    )
    agg = dep.serve("--checkin-s", "1")
    try:
        devices = dep.enroll_devices(4, agg.enroll_port, tmp_path)
        updates, weights = random_updates(devices, seed=3)
        stalled = devices[:2]
        for d in stalled:
            d.start(updates[d.device_id], weights[d.device_id], stall_after="share_keys")
        for d in devices[2:]:
            d.start(updates[d.device_id], weights[d.device_id], attempts=1)
        for d in stalled:
            d.wait_for_line("stalled")
            d.kill()
        results = [d.finish() for d in devices[2:]]
    finally:
        agg.kill()
    for code, lines, _ in results:
        assert code == 4  # the round it took part in did not publish
        assert [line["status"] for line in lines] == ["aborted"]
    status = dep.status()
    assert status["model_versions"] == [1]
    assert status["rounds"][0]["status"] == "aborted"
    assert status["rounds"][0]["participants"] == []
    assert "published model version" not in agg.log()


def test_aggregator_killed_mid_round_resumes_the_round_and_the_next_round_succeeds(tmp_path: Path) -> None:
    port, enroll_port = free_port(), free_port()
    dep = Deployment(
        tmp_path / "agg", min_clients=7, max_clients=8, deadline_s=10, listen=f"127.0.0.1:{port}"
    )
    # A short lease: the restarted process waits for the killed one's lease to expire before it leads.
    serve_args = ("--enroll-listen", f"127.0.0.1:{enroll_port}", "--checkin-s", "2", "--lease-ttl-s", "3")
    agg = dep.serve(*serve_args)
    restarted = None
    try:
        devices = dep.enroll_devices(8, agg.enroll_port, tmp_path)
        updates, weights = random_updates(devices, seed=4)
        # Round 1 completes with all 8; round 2 waits in the masked-input stage for the staller, and the
        # aggregator is SIGKILLed once the 7 others' masked inputs were accepted.
        staller, others = dep.hold_round_two_in_masked_input(devices, updates, weights, rounds=3)
        assert agg.kill() == -9
        staller.kill()
        # The resumed round counts towards --rounds: 2 means the interrupted round plus one more.
        restarted = dep.serve(*serve_args, "--rounds", "2")
        results = [d.finish(timeout=180) for d in others]
    finally:
        agg.kill()
        if restarted is not None:
            restarted.kill()
    for code, lines, err in results:
        assert code == 0, err[-1500:]
        assert [line["status"] for line in lines] == ["published", "published", "published"]
    status = dep.status()
    rounds = status["rounds"]
    assert [(r["status"], r["model_version"]) for r in rounds] == [
        ("published", 2),
        ("published", 3),
        ("published", 4),
    ]
    assert rounds[0]["participants"] == sorted(updates)  # the finished round survived the crash
    rest = {d.device_id: updates[d.device_id] for d in others}
    assert rounds[1]["participants"] == sorted(rest)  # the interrupted round, resumed
    assert rounds[2]["participants"] == sorted(rest)  # the next round, run by the restarted process
    assert dep.device_ids() == sorted(updates)  # no registered device lost
    assert status["model_versions"] == [1, 2, 3, 4]
    assert_published(dep, 2, 1, updates, weights, n=8)
    rest_weights = {d: weights[d] for d in rest}
    assert_published(dep, 3, 2, rest, rest_weights, n=8)
    assert_published(dep, 4, 3, rest, rest_weights, n=7)
    assert "resuming in stage masked_input" in restarted.log()
    assert "round 3 published model version 4" in restarted.log()
