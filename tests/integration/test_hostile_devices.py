"""Hostile devices against a real ``fedfer-aggregator serve``: real ``fedfer-agent join-round`` processes
(one of them patched by :mod:`tests.integration.hostile_agent`), real gRPC over loopback TLS 1.3, real SQLite.

Issue 12, findings 1, 2, 7 and 10: a device pushing its masked input far outside the clip bound, a holder
lying about a victim's share, a device that sends every message under fresh request ids again and again, and
a device that answers just before every deadline.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from fedfer.security.quantize import FixedPointCodec
from tests.integration.federation_harness import (
    CLIP,
    DIM,
    MAX_WEIGHT,
    Deployment,
    Device,
    flat,
    oracle_mean,
    random_updates,
)

pytestmark = pytest.mark.slow


@dataclass
class _Round:
    """One round of four devices, the first of them hostile, run to its end."""

    dep: Deployment
    log: str
    updates: dict[str, npt.NDArray[np.float64]]
    weights: dict[str, int]
    hostile: Device
    hostile_lines: list[dict[str, Any]]
    honest: list[Device]
    honest_results: list[tuple[int, list[dict[str, Any]], str]]


def _hostile_round(
    tmp_path: Path,
    modes: tuple[str, ...],
    *,
    seed: int,
    deadline_s: float = 20,
    grace_s: float | None = None,
    weight: int | None = None,
) -> _Round:
    """Four devices (complete graph, t = 3), the first one started with the hostile ``modes``."""
    dep = Deployment(
        tmp_path / "agg", min_clients=4, max_clients=4, deadline_s=deadline_s, threshold=3,
        complete_graph=True,
    )  # fmt: skip
    if grace_s is not None:  # as `init --straggler-grace-s` would have written it
        text = dep.config.read_text()
        dep.config.write_text(text.replace("straggler_grace_s = 10.0", f"straggler_grace_s = {grace_s}"))
    agg = dep.serve("--rounds", "1", "--checkin-s", "1")
    try:
        devices = dep.enroll_devices(4, agg.enroll_port, tmp_path)
        updates, weights = random_updates(devices, seed=seed)
        if weight is not None:
            weights = dict.fromkeys(weights, weight)
        hostile, *honest = devices
        hostile.start(updates[hostile.device_id], weights[hostile.device_id], attempts=1, hostile=modes)
        for d in honest:
            d.start(updates[d.device_id], weights[d.device_id], attempts=1)
        results = [d.finish() for d in honest]
        _, hostile_lines, _ = hostile.finish()
    finally:
        agg.kill()
    return _Round(dep, agg.log(), updates, weights, hostile, hostile_lines, honest, results)


def test_a_device_pushing_its_masked_input_past_the_clip_bound_aborts_the_round_and_nothing_is_published(
    tmp_path: Path,
) -> None:
    """Finding 1: before, the round published a model moved by ~1000 x clip and told everyone *published*."""
    rnd = _hostile_round(tmp_path, ("--shift-masked", "1000"), seed=21, weight=1)
    for code, lines, err in rnd.honest_results:
        assert code == 4, err[-1500:]  # the round it took part in did not publish
        assert [line["status"] for line in lines] == ["aborted"]
    status = rnd.dep.status()
    assert status["model_versions"] == [1]
    assert status["rounds"][0]["status"] == "aborted"  # (the next round has opened meanwhile)
    assert f"round 1: {DIM} of {DIM} decoded mean coordinates exceed clip plus the error bound" in rnd.log
    assert "round 1 aborted: the aggregate failed validation" in rnd.log
    assert "Traceback" not in rnd.log


def test_a_holder_lying_about_a_victims_share_is_refused_named_and_the_round_publishes_the_true_mean(
    tmp_path: Path,
) -> None:
    """Finding 2: before, a crafted share silently replaced the mean with garbage (weight 1155411254)."""
    rnd = _hostile_round(tmp_path, ("--lie-at-unmask",), seed=22, grace_s=2.0)
    liar = rnd.hostile.device_id
    assert any("lied_about" in line for line in rnd.hostile_lines)  # it did reveal a crafted key
    for code, lines, err in rnd.honest_results:
        assert code == 0, err[-1500:]
        assert [line["status"] for line in lines] == ["published"]
    # Every input is in the sum, the liar's too (its seed came from the three honest holders): the true mean.
    codec = FixedPointCodec(dim=DIM, clip=CLIP, max_weight=MAX_WEIGHT, max_clients=4, modulus_bits=32)
    tol = codec.mean_error_bound(survivors=4, total_weight=sum(rnd.weights.values())) + 1e-6
    expected = flat(rnd.dep.model(1)) + oracle_mean(rnd.updates, rnd.weights, CLIP)
    assert float(np.max(np.abs(flat(rnd.dep.model(2)) - expected))) <= tol
    assert f"device {liar} revealed a key that does not open the share it was dealt: refused" in rnd.log
    assert re.search(rf"round 1: devices {liar} revealed keys that do not open what they were", rnd.log)
    assert "round 1 published model version 2 from 4 devices" in rnd.log
    # The stage did not wait for the liar until its deadline (20 s), only the grace (2 s) after the others.
    refused = _log_time(rnd.log, "revealed a key that does not open")
    published = _log_time(rnd.log, "round 1 published model version 2")
    assert (published - refused).total_seconds() < 10


def _responses(dep: Deployment) -> int:
    path = dep.dir / "aggregator.db"
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])


def test_retries_under_fresh_request_ids_do_not_grow_the_idempotency_records_and_records_expire(
    tmp_path: Path,
) -> None:
    """Finding 7: before, 800 accepted retries grew ``responses`` by 800 rows, and nothing ever pruned it."""
    dep = Deployment(tmp_path / "agg", min_clients=3, max_clients=3, deadline_s=30, complete_graph=True)
    agg = dep.serve("--rounds", "1", "--checkin-s", "1", "--response-retention-s", "4")
    resume = tmp_path / "resume"
    try:
        devices = dep.enroll_devices(3, agg.enroll_port, tmp_path)
        updates, weights = random_updates(devices, seed=23)
        noisy, paused, other = devices
        # The paused device holds the share-keys stage open, so every resend of the noisy one is accepted.
        paused.start(
            updates[paused.device_id], weights[paused.device_id],
            hostile=("--pause-after", "advertise_keys", "--resume-file", str(resume)),
        )  # fmt: skip
        noisy.start(updates[noisy.device_id], weights[noisy.device_id], hostile=("--resend", "200"))
        other.start(updates[other.device_id], weights[other.device_id])
        paused.wait_for_line("paused")
        while (resent := noisy.wait_for_line("resent"))["resent"] != "share keys":
            pass
        resume.touch()
        results = [d.finish() for d in devices]
        after_round = _responses(dep)
        deadline = time.monotonic() + 20
        while _responses(dep) and time.monotonic() < deadline:
            time.sleep(0.25)
        expired = _responses(dep)
        assert agg.proc.poll() is None  # the aggregator still serves
    finally:
        agg.kill()
    assert resent == {"resent": "share keys", "accepted": 200}
    for code, lines, err in results:
        assert code == 0, err[-1500:]
        assert lines[-1]["status"] == "published"
    # 3 enrollments and 5 stage messages per device are recorded once; the resends are answered, not stored.
    assert after_round <= 3 + 3 * 5, after_round
    assert expired == 0
    assert "idempotency records" in agg.log()
    assert dep.device_ids() == sorted(d.device_id for d in devices)  # only the records expired


def _log_time(log: str, pattern: str) -> dt.datetime:
    match = re.search(rf"^(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}}) .*{pattern}", log, flags=re.M)
    assert match is not None, pattern
    return dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")


def test_a_device_answering_just_before_every_deadline_is_dropped_and_the_round_stays_short(
    tmp_path: Path,
) -> None:
    """Finding 10: before, such a device stretched every round to the sum of the deadlines (26.6 s at 6 s)."""
    rnd = _hostile_round(tmp_path, ("--answer-late", "0.5"), seed=24, deadline_s=6, grace_s=1.0)
    for code, lines, err in rnd.honest_results:
        assert code == 0, err[-1500:]
        assert [line["status"] for line in lines] == ["published"]
    assert [line["status"] for line in rnd.hostile_lines] == ["dropped"]
    began = _log_time(rnd.log, r"round 1: 4 devices, degree")
    ended = _log_time(rnd.log, r"round 1 published model version 2 from 3 devices")
    took = (ended - began).total_seconds()
    # One deadline (the late answer is tolerated once) plus one grace, not five deadlines (~27.5 s).
    assert took < 12.0, took
    assert "stragglers for the rest of the round" in rnd.log
    assert "stragglers dropped at the grace" in rnd.log
    (round_record,) = rnd.dep.status()["rounds"]
    assert round_record["participants"] == sorted(d.device_id for d in rnd.honest)
