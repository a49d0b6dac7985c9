"""Verified reconstruction and bounded influence: what one malicious client can and cannot do to a round.

A share holder cannot substitute a share (it reveals keys; the server opens the ciphertexts the owner dealt),
so a lie is refused, named, and the round completes from the honest holders. A dealer whose shares do not
reconstruct the seed it committed to in its signed advertisement makes the round abort naming it. A decoded
aggregate that clipped, weighted inputs cannot produce aborts the round. Inside those bounds a malicious
input is not detected: the last test states by how much it can move the mean.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from fedfer.security.errors import RoundAbortedError
from fedfer.security.secagg import (
    InvalidAggregateError,
    MaskedInput,
    MisbehaviourError,
    ShareVerificationError,
    Stage,
)
from fedfer.security.secagg._derive import seed_commitment
from tests.security.secagg_harness import make_round, oracle, random_inputs, run_round, wire

N, DIM, T, W = 4, 6, 3, 5


def _to_unmask(rnd, updates, weights, *, shift=None):
    """Run the round to the unmask stage; ``shift(cid, vector)`` may alter a masked upload."""
    server = rnd.server
    for c in rnd.clients.values():
        server.receive(wire(c.advertise_keys()))
    for cid, m in server.close_stage().items():
        server.receive(wire(rnd.clients[cid].share_keys(wire(m))))
    for cid, m in server.close_stage().items():
        upload = rnd.clients[cid].masked_input(wire(m), update=updates[cid], weight=weights[cid])
        if shift is not None:
            upload = MaskedInput(upload.round_id, cid, upload.modulus_bits, shift(cid, upload.vector.copy()))
        server.receive(wire(upload))
    for cid, m in server.close_stage().items():
        server.receive(wire(rnd.clients[cid].consistency_check(wire(m))))
    return server.close_stage()


def _flip_first_key(resp, field: str):
    items = getattr(resp, field)
    bad = dataclasses.replace(items[0], key=bytes([items[0].key[0] ^ 0x01]) + items[0].key[1:])
    return dataclasses.replace(resp, **{field: (bad, *items[1:])})


def test_a_holder_lying_about_a_victims_seed_share_is_refused_named_and_the_round_completes():
    rnd = make_round(N, DIM, neighbors=N - 1, threshold=T, max_weight=W)
    updates, weights = random_inputs(N, DIM, W, seed=5)
    out = _to_unmask(rnd, updates, weights)
    liar = 2
    lie = _flip_first_key(rnd.clients[liar].unmask(wire(out[liar])), "seed_keys")
    assert lie.seed_keys[0].owner == 1  # the victim's seed-share ciphertext is what it tries to open falsely
    with pytest.raises(ShareVerificationError) as info:
        rnd.server.receive(wire(lie))
    assert info.value.culprit == liar
    assert rnd.server.flagged() == {liar: "a revealed key does not open the ciphertext it was dealt"}
    assert liar not in rnd.server.received()  # nothing of the lie is used
    for cid in (1, 3, 4):
        rnd.server.receive(wire(rnd.clients[cid].unmask(wire(out[cid]))))
    rnd.server.close_stage()
    result = rnd.server.result()
    # The liar's own input stays in the sum (its seed comes from the three honest holders), the victim's too.
    mean, total_weight = oracle(updates, weights, {1, 2, 3, 4}, 1.0)
    assert result.survivors == (1, 2, 3, 4) and result.flagged == (liar,)
    assert result.total_weight == total_weight
    assert np.max(np.abs(result.mean() - mean)) <= result.error_bound


def test_a_lie_that_leaves_fewer_than_t_verified_holders_aborts_and_names_the_liar():
    rnd = make_round(N, DIM, neighbors=N - 1, threshold=T, max_weight=W)
    updates, weights = random_inputs(N, DIM, W, seed=6)
    out = _to_unmask(rnd, updates, weights)
    with pytest.raises(ShareVerificationError):
        rnd.server.receive(wire(_flip_first_key(rnd.clients[2].unmask(wire(out[2])), "seed_keys")))
    rnd.server.receive(wire(rnd.clients[1].unmask(wire(out[1]))))  # client 3 and 4 stay silent
    with pytest.raises(RoundAbortedError):
        rnd.server.close_stage()
    assert rnd.server.stage is Stage.ABORTED and set(rnd.server.flagged()) == {2}


def test_a_dealer_whose_shares_miss_its_signed_commitment_aborts_the_round_naming_it():
    rnd = make_round(N, DIM, neighbors=N - 1, threshold=T, max_weight=W)
    updates, weights = random_inputs(N, DIM, W, seed=7)
    server = rnd.server
    for c in rnd.clients.values():
        server.receive(wire(c.advertise_keys()))
    rnd.clients[3]._opening = os.urandom(64)  # deals and masks with a seed other than the one it signed
    for cid, m in server.close_stage().items():
        server.receive(wire(rnd.clients[cid].share_keys(wire(m))))
    for cid, m in server.close_stage().items():
        server.receive(wire(rnd.clients[cid].masked_input(wire(m), update=updates[cid], weight=weights[cid])))
    for cid, m in server.close_stage().items():
        server.receive(wire(rnd.clients[cid].consistency_check(wire(m))))
    for cid, m in server.close_stage().items():
        server.receive(wire(rnd.clients[cid].unmask(wire(m))))  # every holder is honest
    with pytest.raises(MisbehaviourError) as info:
        server.close_stage()
    assert info.value.culprits == (3,)
    assert server.stage is Stage.ABORTED
    with pytest.raises(RoundAbortedError):
        server.result()


def test_a_shifted_masked_input_aborts_with_a_specific_error_and_reveals_no_result():
    updates, weights = random_inputs(N, DIM, W, seed=8)
    honest, total_weight = oracle(updates, weights, {1, 2, 3, 4}, 1.0)
    scale = make_round(N, DIM, neighbors=N - 1, threshold=T, max_weight=W).params.codec().scale
    # Added after masking: moves every decoded mean coordinate to clip + 0.5 (finding 1's attack, aimed).
    push = np.rint((1.5 - honest) * total_weight * scale).astype(np.int64).astype(np.uint32)
    for what, shift in (
        ("coordinates", lambda v: np.concatenate([v[:-1] + push, v[-1:]])),
        ("weight", lambda v: np.concatenate([v[:-1], v[-1:] - np.uint32(1 << 30)])),
    ):
        rnd = make_round(N, DIM, neighbors=N - 1, threshold=T, max_weight=W)
        out = _to_unmask(rnd, updates, weights, shift=lambda cid, v, s=shift: s(v) if cid == 2 else v)
        for cid, m in out.items():
            rnd.server.receive(wire(rnd.clients[cid].unmask(wire(m))))
        with pytest.raises(InvalidAggregateError) as info:
            rnd.server.close_stage()
        expected = "total weight" if what == "weight" else f"{DIM} of {DIM} decoded mean coordinates exceed"
        assert expected in str(info.value)
        assert rnd.server.stage is Stage.ABORTED and rnd.server.flagged() == {}
        with pytest.raises(RoundAbortedError):
            rnd.server.result()


def test_inside_the_clip_bound_a_malicious_input_is_accepted_and_moves_the_mean_at_most_to_the_clip():
    """The remaining threat, stated: one client may upload any clipped vector with any weight up to W."""
    rnd = make_round(N, DIM, neighbors=N - 1, threshold=T, max_weight=W)
    updates, weights = random_inputs(N, DIM, W, seed=9)
    updates[2] = np.full(DIM, 1.0, dtype=np.float32)  # as far as the clip allows, with the largest weight
    weights[2] = W
    out = _to_unmask(rnd, updates, weights)
    for cid, m in out.items():
        rnd.server.receive(wire(rnd.clients[cid].unmask(wire(m))))
    rnd.server.close_stage()
    result = rnd.server.result()
    honest, _ = oracle(updates, weights, {1, 3, 4}, 1.0)
    pulled = result.mean() - honest
    # Its pull on each coordinate is (clip - honest mean) * W / total weight: bounded, and not detected.
    assert np.all(pulled > 0)
    assert np.all(pulled <= (1.0 - honest) * W / result.total_weight + result.error_bound)
    assert np.max(np.abs(result.mean())) <= rnd.params.clip + result.error_bound


@pytest.mark.parametrize(
    ("bits", "clip", "weight"), [(32, 1.0, 5), (48, 18.375, 3), (56, 0.3, 5), (62, 18.375, 1), (62, 0.3, 5)]
)
def test_an_honest_round_with_every_update_at_the_clip_passes_the_aggregate_check(bits, clip, weight):
    """The check allows clip + error bound, and the bound counts float64's rounding of encode and decode: at
    large moduli that rounding is most of the error (a bound of rounding to integers alone aborted these)."""
    rnd = make_round(3, DIM, neighbors=2, threshold=2, max_weight=5, clip=clip, modulus_bits=bits)
    at_clip = np.resize(np.array([clip, -clip]), DIM)
    result = run_round(rnd, {i: at_clip.copy() for i in (1, 2, 3)}, dict.fromkeys((1, 2, 3), weight))
    assert result.survivors == (1, 2, 3) and result.total_weight == 3 * weight
    assert np.max(np.abs(result.mean() - at_clip)) <= result.error_bound


def test_the_seed_commitment_hides_the_seed_behind_a_fresh_nonce():
    digest = os.urandom(32)
    seed = os.urandom(32)
    first = seed_commitment(digest, 1, os.urandom(32) + seed)
    second = seed_commitment(digest, 1, os.urandom(32) + seed)
    assert first != second  # the same seed commits differently: the commitment is no function of it alone
    rnd = make_round(N, DIM, neighbors=N - 1, threshold=T)
    ads = [rnd.clients[i].advertise_keys() for i in (1, 2)]
    assert ads[0].seed_commitment != ads[1].seed_commitment
    opening = rnd.clients[1]._opening
    assert seed_commitment(rnd.params.digest, 1, opening) == ads[0].seed_commitment
    assert seed_commitment(rnd.params.digest, 2, opening) != ads[0].seed_commitment  # bound to the client


def test_a_snapshot_taken_after_a_refused_lie_restores_and_completes():
    rnd = make_round(N, DIM, neighbors=N - 1, threshold=T, max_weight=W)
    updates, weights = random_inputs(N, DIM, W, seed=10)
    out = _to_unmask(rnd, updates, weights)
    with pytest.raises(ShareVerificationError):
        rnd.server.receive(wire(_flip_first_key(rnd.clients[4].unmask(wire(out[4])), "seed_keys")))
    for cid in (1, 2):
        rnd.server.receive(wire(rnd.clients[cid].unmask(wire(out[cid]))))
    restored = type(rnd.server).restore(rnd.server.snapshot(), identity_keys=rnd.roster)
    assert restored.received() == {1, 2}
    restored.receive(wire(rnd.clients[3].unmask(wire(out[3]))))
    restored.close_stage()
    mean, _ = oracle(updates, weights, {1, 2, 3, 4}, 1.0)
    assert np.max(np.abs(restored.result().mean() - mean)) <= restored.result().error_bound
