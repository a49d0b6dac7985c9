"""Whole secure-aggregation rounds: correctness against plaintext FedAvg, dropouts, aborts, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from fedfer.security.errors import ProtocolError, RoundAbortedError, ValidationError
from fedfer.security.secagg import (
    MaskedInput,
    NeighbourGraph,
    SecAggParams,
    SecAggServer,
    Stage,
    decode_message,
    default_neighbors,
    default_threshold,
    threshold_for_colluders,
)
from tests.security.secagg_harness import (
    STAGES,
    expected_outcome,
    honest_clients_done,
    make_round,
    oracle,
    random_inputs,
    run_round,
    wire,
)


def _check(rnd, updates, weights, drops):
    survivors = expected_outcome(rnd.params, rnd.graph, drops)
    assert survivors is not None
    result = run_round(rnd, updates, weights, drops)
    mean, total_weight = oracle(updates, weights, survivors, rnd.params.clip)
    assert set(result.survivors) == survivors
    assert result.total_weight == total_weight
    assert np.max(np.abs(result.mean() - mean)) <= result.error_bound
    assert honest_clients_done(rnd, {c for c in survivors if c not in drops})
    return result


@pytest.mark.parametrize("neighbors", [None, 2, 6])
def test_sparse_graph_round_matches_fedavg(neighbors):
    rnd = make_round(24, 33, neighbors=neighbors)
    assert not rnd.params.complete_graph
    updates, weights = random_inputs(24, 33, rnd.params.max_weight, seed=1)
    _check(rnd, updates, weights, {})


@pytest.mark.parametrize("stage", STAGES)
def test_complete_graph_dropouts_at_each_stage(stage):
    rnd = make_round(9, 17, neighbors=8)
    assert rnd.params.complete_graph and rnd.params.threshold == 5
    updates, weights = random_inputs(9, 17, rnd.params.max_weight, seed=2)
    _check(rnd, updates, weights, {2: stage, 7: stage, 9: stage})


def test_mixed_dropouts_in_sparse_graph():
    rnd = make_round(40, 10, neighbors=8, threshold=4)
    updates, weights = random_inputs(40, 10, rnd.params.max_weight, seed=3)
    drops = {3: "advertise", 11: "share", 12: "masked", 20: "masked", 31: "unmask", 38: "unmask"}
    result = _check(rnd, updates, weights, drops)
    assert 31 in result.survivors and 12 not in result.survivors


def test_dropped_pairwise_masks_cancel_when_all_neighbours_of_dropper_survive():
    # Dropping after the masked input keeps the update in the sum; dropping before removes it.
    rnd = make_round(6, 5, neighbors=5)
    updates, weights = random_inputs(6, 5, rnd.params.max_weight, seed=4)
    result = _check(rnd, updates, weights, {1: "masked", 2: "unmask"})
    assert result.survivors == (2, 3, 4, 5, 6)


@pytest.mark.parametrize("stage", STAGES)
def test_abort_exactly_below_threshold(stage):
    # n=7, complete graph, t=4: three drops leave 4 (completes), four drops leave 3 (aborts).
    updates, weights = random_inputs(7, 4, 5, seed=5)
    ok = make_round(7, 4, neighbors=6, threshold=4)
    _check(ok, updates, weights, dict.fromkeys((1, 2, 3), stage))
    bad = make_round(7, 4, neighbors=6, threshold=4)
    with pytest.raises(RoundAbortedError):
        run_round(bad, updates, weights, dict.fromkeys((1, 2, 3, 4), stage))
    assert bad.server.stage is Stage.ABORTED
    with pytest.raises(RoundAbortedError):
        bad.server.result()
    with pytest.raises(RoundAbortedError):
        bad.server.close_stage()


def test_abort_reveals_nothing_and_clients_keep_secrets():
    rnd = make_round(5, 3, neighbors=4, threshold=3)
    updates, weights = random_inputs(5, 3, 5, seed=6)
    server = rnd.server
    for c in rnd.clients.values():
        server.receive(c.advertise_keys())
    for cid, m in server.close_stage().items():
        server.receive(rnd.clients[cid].share_keys(m))
    for cid, m in server.close_stage().items():
        server.receive(rnd.clients[cid].masked_input(m, update=updates[cid], weight=weights[cid]))
    for cid, m in server.close_stage().items():
        server.receive(rnd.clients[cid].consistency_check(m))
    server.close_stage()
    # Only two unmask responses arrive (< t = 3): the server aborts before reconstructing anything.
    for cid in (1, 2):
        server.receive(rnd.clients[cid].unmask(server.message_for(cid)))
    with pytest.raises(RoundAbortedError):
        server.close_stage()
    assert server._sum is None and not server._responses  # masked sum and shares are dropped
    assert rnd.clients[3].stage is Stage.UNMASK  # the others never revealed anything


def test_two_clients_minimum():
    rnd = make_round(2, 3)
    assert rnd.params.complete_graph and rnd.params.threshold == 2
    updates, weights = random_inputs(2, 3, rnd.params.max_weight, seed=7)
    _check(rnd, updates, weights, {})
    rnd2 = make_round(2, 3)
    with pytest.raises(RoundAbortedError):
        run_round(rnd2, updates, weights, {2: "masked"})


@pytest.mark.parametrize("bits", [16, 20, 40])
def test_other_moduli(bits):
    rnd = make_round(5, 9, neighbors=4, threshold=3, modulus_bits=bits, max_weight=3)
    updates, weights = random_inputs(5, 9, 3, seed=8)
    _check(rnd, updates, weights, {4: "masked"})


def test_neighbour_graph_is_regular_symmetric_and_deterministic():
    params = SecAggParams.create(round_id=b"r" * 32, num_clients=101, dim=1, neighbors=12)
    g1, g2 = NeighbourGraph(params), NeighbourGraph(params)
    for u in range(1, 102):
        assert len(g1.neighbors(u)) == 12 and u not in g1.neighbors(u)
        assert g1.neighbors(u) == g2.neighbors(u)
        assert all(u in g1.neighbors(v) for v in g1.neighbors(u))
    other = NeighbourGraph(SecAggParams.create(round_id=b"s" * 32, num_clients=101, dim=1, neighbors=12))
    assert any(other.neighbors(u) != g1.neighbors(u) for u in range(1, 102))


def test_defaults():
    assert default_neighbors(1000) == 30 and default_neighbors(100) == 20 and default_neighbors(10) == 9
    assert default_threshold(1000, 30) == 16 and default_threshold(100, 99) == 51


def test_collusion_bounds_and_the_threshold_that_tolerates_colluders():
    p = SecAggParams.create(round_id=b"r" * 32, num_clients=7, dim=1, neighbors=6, threshold=5)
    assert p.holders_per_client == 7 and p.colluders_tolerated == 4
    assert p.colluders_tolerated_by_lying_server == 2  # 2t - h - 1
    assert threshold_for_colluders(1000, 30, 0) == default_threshold(1000, 30) == 16
    for n, k in ((7, 6), (100, 20), (1000, 30), (50, 49)):
        h = k + 1
        for c in range(0, h - 1):
            if (h + c) // 2 + 1 > h:
                with pytest.raises(ValidationError):
                    threshold_for_colluders(n, k, c)
                continue
            t = threshold_for_colluders(n, k, c)
            # Enough to defeat the lie, and the least such t (t - 1 would let c colluders win it).
            assert 2 * t - h > c and (t - 1 < 2 or 2 * (t - 1) - h <= c)
            params = SecAggParams.create(round_id=b"r" * 32, num_clients=n, dim=1, neighbors=k, threshold=t)
            assert params.colluders_tolerated_by_lying_server >= c
    with pytest.raises(ValidationError):
        threshold_for_colluders(7, 6, -1)


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 4])
def test_snapshot_restore_at_every_stage(stop_after):
    rnd = make_round(8, 6, neighbors=4, threshold=3)
    updates, weights = random_inputs(8, 6, rnd.params.max_weight, seed=9)
    server = rnd.server
    drops = {5: "masked"}

    def restart():
        nonlocal server
        snap = server.snapshot()
        server = SecAggServer.restore(snap, identity_keys=rnd.roster)
        assert server.snapshot() == snap

    for cid, c in rnd.clients.items():
        server.receive(wire(c.advertise_keys()))
        if stop_after == 0 and cid == 4:
            restart()
    out = server.close_stage()
    for cid, m in out.items():
        server.receive(wire(rnd.clients[cid].share_keys(wire(m))))
        if stop_after == 1 and cid == 4:
            restart()
    out = server.close_stage()
    for cid, m in out.items():
        if cid in drops:
            continue
        server.receive(wire(rnd.clients[cid].masked_input(wire(m), update=updates[cid], weight=weights[cid])))
        if stop_after == 2 and cid == 4:
            restart()
    if stop_after == 2:
        restart()
    out = server.close_stage()
    for cid, m in out.items():
        if stop_after == 3:
            restart()
            assert server.message_for(cid) == m
        server.receive(wire(rnd.clients[cid].consistency_check(wire(m))))
    out = server.close_stage()
    for cid, m in out.items():
        if stop_after == 4:
            restart()
            assert server.message_for(cid) == m
        server.receive(wire(rnd.clients[cid].unmask(wire(m))))
    server.close_stage()
    result = server.result()
    mean, _ = oracle(updates, weights, set(range(1, 9)) - {5}, 1.0)
    assert np.max(np.abs(result.mean() - mean)) <= result.error_bound
    with pytest.raises(ProtocolError):
        server.snapshot()


def test_snapshot_of_aborted_round_restores_aborted():
    rnd = make_round(3, 2, neighbors=2, threshold=3)
    rnd.server.receive(rnd.clients[1].advertise_keys())
    with pytest.raises(RoundAbortedError):
        rnd.server.close_stage()
    restored = SecAggServer.restore(rnd.server.snapshot(), identity_keys=rnd.roster)
    assert restored.stage is Stage.ABORTED


def test_masked_input_is_four_bytes_per_element_and_upload_overhead_is_small():
    dim = 5000
    rnd = make_round(12, dim)
    updates, weights = random_inputs(12, dim, rnd.params.max_weight, seed=10)
    server = rnd.server
    uploaded = dict.fromkeys(rnd.clients, 0)
    for cid, c in rnd.clients.items():
        data = c.advertise_keys().to_bytes()
        uploaded[cid] += len(data)
        server.receive(decode_message(data))
    for cid, m in server.close_stage().items():
        data = rnd.clients[cid].share_keys(m).to_bytes()
        uploaded[cid] += len(data)
        server.receive(decode_message(data))
    for cid, m in server.close_stage().items():
        msg = rnd.clients[cid].masked_input(m, update=updates[cid], weight=weights[cid])
        data = msg.to_bytes()
        assert len(data) - 4 * (dim + 1) < 64
        assert MaskedInput.from_bytes(data).vector.dtype == np.uint32
        uploaded[cid] += len(data)
        server.receive(decode_message(data))
    for cid, m in server.close_stage().items():
        data = rnd.clients[cid].consistency_check(m).to_bytes()
        uploaded[cid] += len(data)
        server.receive(decode_message(data))
    for cid, m in server.close_stage().items():
        data = rnd.clients[cid].unmask(m).to_bytes()
        uploaded[cid] += len(data)
        server.receive(decode_message(data))
    server.close_stage()
    assert max(uploaded.values()) <= 1.2 * 4 * dim


def test_client_refuses_serialization_and_hides_secrets_in_repr():
    import copy
    import pickle

    rnd = make_round(3, 2)
    client = rnd.clients[1]
    client.advertise_keys()
    with pytest.raises(TypeError):
        pickle.dumps(client)
    with pytest.raises(TypeError):
        copy.deepcopy(client)
    assert repr(client) == "SecAggClient(client_id=1, stage=share_keys)"


def test_random_seam_makes_a_whole_round_reproducible():
    from fedfer.security.crypto import hkdf_sha256
    from fedfer.security.keys import IdentityKey
    from fedfer.security.secagg import SecAggClient

    def seeded(label: bytes):
        counter = 0

        def draw(n: int) -> bytes:
            nonlocal counter
            counter += 1
            return hkdf_sha256(label, info=counter.to_bytes(8, "little"), length=n)

        return draw

    ids = {i: IdentityKey.generate(_random_bytes=seeded(b"id%d" % i)) for i in range(1, 5)}
    roster = {i: k.public_bytes() for i, k in ids.items()}
    updates, weights = random_inputs(4, 3, 5, seed=13)
    transcripts = []
    for _ in range(2):
        params = SecAggParams.create(
            round_id=b"fixed-round-id-0123456789abcdef", num_clients=4, dim=3, max_weight=5
        )
        server = SecAggServer(params=params, identity_keys=roster)
        clients = {
            i: SecAggClient(
                params=params,
                client_id=i,
                identity_key=ids[i],
                identity_keys=roster,
                _random_bytes=seeded(b"c%d" % i),
            )
            for i in ids
        }
        log = []
        for c in clients.values():
            log.append(c.advertise_keys().to_bytes())
            server.receive(decode_message(log[-1]))
        for cid, m in server.close_stage().items():
            log.append(clients[cid].share_keys(m).to_bytes())
            server.receive(decode_message(log[-1]))
        for cid, m in server.close_stage().items():
            log.append(clients[cid].masked_input(m, update=updates[cid], weight=weights[cid]).to_bytes())
            server.receive(decode_message(log[-1]))
        for cid, m in server.close_stage().items():
            log.append(clients[cid].consistency_check(m).to_bytes())
            server.receive(decode_message(log[-1]))
        for cid, m in server.close_stage().items():
            log.append(clients[cid].unmask(m).to_bytes())
            server.receive(decode_message(log[-1]))
        server.close_stage()
        transcripts.append(log)
    assert transcripts[0] == transcripts[1]
    # Without the seam (production), the same round produces fresh keys every time.
    a = make_round(3, 2, round_id=b"fixed-round-id-0123456789abcdef")
    b = make_round(3, 2, round_id=b"fixed-round-id-0123456789abcdef", identities=a.identities)
    assert a.clients[1].advertise_keys().to_bytes() != b.clients[1].advertise_keys().to_bytes()
