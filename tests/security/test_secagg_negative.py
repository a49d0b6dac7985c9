"""Negative tests: every malformed, misplaced, forged or replayed message gives a clear error, changes no
honest state, and leaves the honest clients' secrets unrevealed; the round then still completes correctly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedfer.security.errors import IntegrityError, ProtocolError, RoundAbortedError, ValidationError
from fedfer.security.keys import IdentityKey
from fedfer.security.secagg import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    DuplicateMessageError,
    KeysBroadcast,
    MaskedInput,
    ShareKeys,
    SharesBroadcast,
    ShareVerificationError,
    SignedSurvivors,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from fedfer.security.secagg.messages import signed_keys_payload
from tests.security.secagg_harness import make_round, oracle, random_inputs, run_round, wire

N, DIM = 6, 5


@pytest.fixture
def rnd():
    return make_round(N, DIM, neighbors=N - 1, threshold=3)


@pytest.fixture
def inputs():
    return random_inputs(N, DIM, 5, seed=11)


def _finish_and_check(rnd, updates, weights, survivors):
    """Drive the rest of the round from wherever the server is and compare with the oracle."""
    server = rnd.server
    if server.stage is Stage.ADVERTISE_KEYS:
        for cid in sorted(server.pending()):
            if cid in survivors or rnd.clients[cid].stage is Stage.ADVERTISE_KEYS:
                server.receive(wire(rnd.clients[cid].advertise_keys()))
        for cid, m in server.close_stage().items():
            server.receive(wire(rnd.clients[cid].share_keys(wire(m))))
    if server.stage is Stage.SHARE_KEYS:
        for cid in sorted(server.pending()):
            server.receive(wire(rnd.clients[cid].share_keys(wire(server.message_for(cid)))))
    if server.stage is Stage.SHARE_KEYS:
        server.close_stage()
    if server.stage is Stage.MASKED_INPUT:
        for cid in sorted(server.pending()):
            if cid in survivors:
                m = wire(server.message_for(cid))
                server.receive(
                    wire(rnd.clients[cid].masked_input(m, update=updates[cid], weight=weights[cid]))
                )
        server.close_stage()
    if server.stage is Stage.CONSISTENCY_CHECK:
        for cid in sorted(server.pending()):
            server.receive(wire(rnd.clients[cid].consistency_check(wire(server.message_for(cid)))))
        server.close_stage()
    for cid in sorted(server.pending()):
        server.receive(wire(rnd.clients[cid].unmask(wire(server.message_for(cid)))))
    server.close_stage()
    result = server.result()
    mean, total_weight = oracle(updates, weights, survivors, rnd.params.clip)
    assert result.total_weight == total_weight
    assert np.max(np.abs(result.mean() - mean)) <= result.error_bound


def _secrets_gone(client) -> bool:
    return (
        client._opening is None
        and client._mask_key is None
        and client._own_shares is None
        and not client._held
        and not client._pair_secrets
    )


def _to_masked_stage(rnd):
    server = rnd.server
    for c in rnd.clients.values():
        server.receive(wire(c.advertise_keys()))
    for cid, m in server.close_stage().items():
        server.receive(wire(rnd.clients[cid].share_keys(wire(m))))
    return server.close_stage()


# -- wrong stage ---------------------------------------------------------------------------------------------


def test_wrong_stage_messages_are_rejected_without_changing_state(rnd, inputs):
    updates, weights = inputs
    server = rnd.server
    adv = rnd.clients[1].advertise_keys()
    bogus_share = ShareKeys(rnd.params.round_id, 1, ())
    with pytest.raises(ProtocolError):
        server.receive(bogus_share)  # share stage message during key advertisement
    assert server.received() == frozenset()
    server.receive(adv)
    with pytest.raises(ProtocolError):
        rnd.clients[2].masked_input(
            SharesBroadcast(rnd.params.round_id, 2, ()), update=updates[2], weight=weights[2]
        )  # client 2 has not even advertised keys
    assert rnd.clients[2].stage is Stage.ADVERTISE_KEYS  # rejected, not aborted
    with pytest.raises(ProtocolError):
        rnd.clients[1].advertise_keys()  # twice
    assert rnd.clients[1].stage is Stage.SHARE_KEYS
    _finish_and_check(rnd, updates, weights, set(range(1, N + 1)))


def test_results_and_messages_are_unavailable_before_their_stage(rnd):
    with pytest.raises(ProtocolError):
        rnd.server.result()
    with pytest.raises(ProtocolError):
        rnd.server.message_for(1)


# -- duplicate, missing and extra messages -------------------------------------------------------------------


def test_duplicate_messages_are_rejected_and_not_double_counted(rnd, inputs):
    updates, weights = inputs
    server = rnd.server
    for cid, c in rnd.clients.items():
        adv = c.advertise_keys()
        server.receive(wire(adv))
        if cid == 2:
            with pytest.raises(DuplicateMessageError):
                server.receive(wire(adv))
    for cid, m in server.close_stage().items():
        server.receive(wire(rnd.clients[cid].share_keys(wire(m))))
    for cid, m in server.close_stage().items():
        msg = rnd.clients[cid].masked_input(wire(m), update=updates[cid], weight=weights[cid])
        server.receive(wire(msg))
        if cid == 3:
            with pytest.raises(DuplicateMessageError):
                server.receive(wire(msg))  # would double-count client 3 if accepted
    _finish_and_check(rnd, updates, weights, set(range(1, N + 1)))


def test_shares_to_missing_or_extra_receivers_are_rejected(inputs):
    updates, weights = random_inputs(10, DIM, 5, seed=12)
    rnd = make_round(10, DIM, neighbors=4, threshold=3)
    server = rnd.server
    for c in rnd.clients.values():
        server.receive(c.advertise_keys())
    out = server.close_stage()
    msg = rnd.clients[1].share_keys(out[1])
    missing = ShareKeys(msg.round_id, 1, msg.shares[1:])
    with pytest.raises(ProtocolError):
        server.receive(missing)
    stranger = next(v for v in range(2, 11) if v not in rnd.graph.neighbors(1))
    extra = ShareKeys(
        msg.round_id,
        1,
        tuple(
            sorted(
                (*msg.shares, dataclasses.replace(msg.shares[0], receiver=stranger)), key=lambda s: s.receiver
            )
        ),
    )
    with pytest.raises(ProtocolError):
        server.receive(extra)
    assert 1 not in server.received()
    server.receive(msg)
    for cid in range(2, 11):
        server.receive(rnd.clients[cid].share_keys(out[cid]))
    server.close_stage()
    for cid in range(1, 11):
        m = server.message_for(cid)
        server.receive(rnd.clients[cid].masked_input(m, update=updates[cid], weight=weights[cid]))
    _finish_and_check(rnd, updates, weights, set(range(1, 11)))


def test_messages_from_non_participants_are_rejected(rnd, inputs):
    updates, weights = inputs
    server = rnd.server
    for cid, c in rnd.clients.items():
        if cid != 6:
            server.receive(c.advertise_keys())
    late = rnd.clients[6].advertise_keys()
    out = server.close_stage()  # client 6 missed the deadline: dropped
    with pytest.raises(ProtocolError):
        server.receive(late)  # wrong stage now
    assert 6 not in out
    with pytest.raises(ProtocolError):
        server.receive(ShareKeys(rnd.params.round_id, 6, ()))  # dropped client cannot rejoin
    foreign = AdvertiseKeys(rnd.params.round_id, 99, b"a" * 32, b"b" * 32, b"c" * 32, b"s" * 64)
    with pytest.raises(ProtocolError):
        rnd.server.receive(foreign)
    for cid, m in out.items():
        server.receive(rnd.clients[cid].share_keys(m))
    server.close_stage()
    _finish_and_check(rnd, updates, weights, set(range(1, 6)))


def test_masked_input_of_wrong_shape_or_modulus_leaves_the_sum_alone(rnd, inputs):
    updates, weights = inputs
    out = _to_masked_stage(rnd)
    rid = rnd.params.round_id
    with pytest.raises(ProtocolError):
        rnd.server.receive(MaskedInput(rid, 1, 32, np.zeros(DIM + 2, dtype=np.uint32)))
    with pytest.raises(ProtocolError):
        rnd.server.receive(MaskedInput(rid, 1, 24, np.zeros(DIM + 1, dtype=np.uint32)))
    assert rnd.server.received() == frozenset()
    for cid, m in out.items():
        rnd.server.receive(rnd.clients[cid].masked_input(m, update=updates[cid], weight=weights[cid]))
    _finish_and_check(rnd, updates, weights, set(range(1, N + 1)))


# -- wrong types ---------------------------------------------------------------------------------------------


def test_wrong_types_are_rejected(rnd, inputs):
    updates, weights = inputs
    with pytest.raises(ProtocolError):
        rnd.server.receive(rnd.clients[1].advertise_keys().to_bytes())  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        rnd.server.receive({"sender": 1})  # type: ignore[arg-type]
    assert rnd.server.received() == frozenset()
    out = _to_masked_stage(make_round(N, DIM, neighbors=N - 1, threshold=3))  # unrelated round
    with pytest.raises(ProtocolError):
        rnd.clients[1].share_keys(out[1])  # a SharesBroadcast where a KeysBroadcast is due
    rnd2 = make_round(N, DIM, neighbors=N - 1, threshold=3)
    out2 = _to_masked_stage(rnd2)
    client = rnd2.clients[2]
    with pytest.raises(ValidationError):
        client.masked_input(out2[2], update=updates[2], weight=True)  # bool is not a weight
    with pytest.raises(ValidationError):
        client.masked_input(out2[2], update=updates[2].astype(np.int32), weight=2)
    with pytest.raises(ValidationError):
        client.masked_input(out2[2], update=updates[2][:-1], weight=2)
    assert client.stage is Stage.MASKED_INPUT  # a bad local input does not abort the client
    for cid, m in out2.items():
        rnd2.server.receive(rnd2.clients[cid].masked_input(m, update=updates[cid], weight=weights[cid]))
    _finish_and_check(rnd2, updates, weights, set(range(1, N + 1)))


# -- tampering, forged signatures, misaddressed and replayed shares ------------------------------------------


def _flip(ct: bytes) -> bytes:
    b = bytearray(ct)
    b[30] ^= 0x40
    return bytes(b)


def test_tampered_share_ciphertext_aborts_only_that_client(rnd, inputs):
    updates, weights = inputs

    def tamper(stage, cid, msg):
        if stage == "masked" and cid == 4:
            first = msg.shares[0]
            flipped = dataclasses.replace(first, key_ciphertext=_flip(first.key_ciphertext))
            return SharesBroadcast(msg.round_id, 4, (flipped, *msg.shares[1:]))
        return msg

    errors: dict = {}
    result = run_round(rnd, updates, weights, tamper=tamper, client_errors=errors)
    assert set(errors) == {4} and type(errors[4]) is IntegrityError
    assert rnd.clients[4].stage is Stage.ABORTED and _secrets_gone(rnd.clients[4])
    mean, _ = oracle(updates, weights, set(range(1, N + 1)) - {4}, 1.0)
    assert 4 not in result.survivors
    assert np.max(np.abs(result.mean() - mean)) <= result.error_bound


def test_share_redirected_to_another_client_is_detected(rnd, inputs):
    updates, weights = inputs
    out = None
    server = rnd.server
    for c in rnd.clients.values():
        server.receive(c.advertise_keys())
    for cid, m in server.close_stage().items():
        server.receive(rnd.clients[cid].share_keys(m))
    out = server.close_stage()
    # A malicious server hands client 3 the share client 1 encrypted for client 2, relabelled for client 3.
    stolen = next(s for s in out[2].shares if s.sender == 1)
    forged = SharesBroadcast(
        out[3].round_id,
        3,
        tuple(dataclasses.replace(stolen, receiver=3) if s.sender == 1 else s for s in out[3].shares),
    )
    with pytest.raises(IntegrityError):
        rnd.clients[3].masked_input(forged, update=updates[3], weight=weights[3])
    assert rnd.clients[3].stage is Stage.ABORTED and _secrets_gone(rnd.clients[3])
    for cid in (1, 2, 4, 5, 6):
        server.receive(rnd.clients[cid].masked_input(out[cid], update=updates[cid], weight=weights[cid]))
    _finish_and_check(rnd, updates, weights, {1, 2, 4, 5, 6})


def test_share_replayed_from_an_earlier_round_is_detected(inputs):
    updates, weights = inputs
    ids = {i: IdentityKey.generate() for i in range(1, N + 1)}
    old = make_round(N, DIM, neighbors=N - 1, threshold=3, identities=ids)
    old_out = _to_masked_stage(old)
    new = make_round(N, DIM, neighbors=N - 1, threshold=3, identities=ids)
    new_out = _to_masked_stage(new)
    replayed = SharesBroadcast(
        new.params.round_id,
        2,
        tuple(next(o for o in old_out[2].shares if o.sender == s.sender) for s in new_out[2].shares),
    )
    with pytest.raises(IntegrityError):
        new.clients[2].masked_input(replayed, update=updates[2], weight=weights[2])
    with pytest.raises(ProtocolError):
        new.clients[3].masked_input(old_out[3], update=updates[3], weight=weights[3])  # old round id
    assert new.clients[3].stage is Stage.MASKED_INPUT
    for cid in (1, 3, 4, 5, 6):
        new.server.receive(
            new.clients[cid].masked_input(new_out[cid], update=updates[cid], weight=weights[cid])
        )
    _finish_and_check(new, updates, weights, {1, 3, 4, 5, 6})


def test_keys_replayed_from_an_earlier_round_fail(inputs):
    ids = {i: IdentityKey.generate() for i in range(1, N + 1)}
    old = make_round(N, DIM, neighbors=N - 1, threshold=3, identities=ids)
    new = make_round(N, DIM, neighbors=N - 1, threshold=3, identities=ids)
    old_adv = old.clients[1].advertise_keys()
    with pytest.raises(ProtocolError):
        new.server.receive(old_adv)  # round id of another round
    with pytest.raises(IntegrityError):
        new.server.receive(
            dataclasses.replace(old_adv, round_id=new.params.round_id)
        )  # signature binds round
    assert new.server.received() == frozenset()


def test_bad_signature_is_rejected_by_server(rnd):
    adv = rnd.clients[1].advertise_keys()
    forged = dataclasses.replace(adv, signature=bytes(64))
    with pytest.raises(IntegrityError):
        rnd.server.receive(forged)
    impostor = IdentityKey.generate()  # signs client 1's keys, but is not client 1's registered identity
    payload = signed_keys_payload(rnd.params.digest, 1, adv.encryption_key, adv.mask_key, adv.seed_commitment)
    with pytest.raises(IntegrityError):
        rnd.server.receive(dataclasses.replace(adv, signature=impostor.sign(payload)))
    with pytest.raises(IntegrityError):  # the signature covers the seed commitment too
        rnd.server.receive(dataclasses.replace(adv, seed_commitment=bytes(32)))
    rnd.server.receive(adv)
    assert rnd.server.received() == frozenset({1})


def test_server_substituting_a_neighbours_keys_is_caught_by_the_client(rnd, inputs):
    updates, weights = inputs
    server = rnd.server
    for c in rnd.clients.values():
        server.receive(c.advertise_keys())
    out = server.close_stage()
    # The server swaps in its own key pair for client 2, signed with a key it controls (man in the middle).
    mitm = IdentityKey.generate()
    entry = out[1].entries[1]
    fake_enc, fake_mask = b"\x09" * 32, b"\x0a" * 32
    sig = mitm.sign(
        signed_keys_payload(rnd.params.digest, entry.sender, fake_enc, fake_mask, entry.seed_commitment)
    )
    fake_entry = AdvertiseKeys(entry.round_id, entry.sender, fake_enc, fake_mask, entry.seed_commitment, sig)
    forged = KeysBroadcast(out[1].round_id, 1, (out[1].entries[0], fake_entry, *out[1].entries[2:]))
    with pytest.raises(IntegrityError):
        rnd.clients[1].share_keys(forged)
    assert rnd.clients[1].stage is Stage.ABORTED and _secrets_gone(rnd.clients[1])
    # Tampering with the client's own entry is caught too.
    own = out[2].entries[1]
    altered = KeysBroadcast(
        out[2].round_id,
        2,
        (out[2].entries[0], dataclasses.replace(own, mask_key=b"\x0b" * 32), *out[2].entries[2:]),
    )
    with pytest.raises(IntegrityError):
        rnd.clients[2].share_keys(altered)
    for cid in (3, 4, 5, 6):
        server.receive(rnd.clients[cid].share_keys(out[cid]))
    server.close_stage()
    _finish_and_check(rnd, updates, weights, {3, 4, 5, 6})


def test_keys_from_a_non_neighbour_are_rejected():
    rnd = make_round(10, 3, neighbors=4, threshold=3)
    server = rnd.server
    for c in rnd.clients.values():
        server.receive(c.advertise_keys())
    out = server.close_stage()
    stranger = next(v for v in range(2, 11) if v not in rnd.graph.neighbors(1))
    extra_entry = server._keys[stranger]
    forged = KeysBroadcast(
        out[1].round_id, 1, tuple(sorted((*out[1].entries, extra_entry), key=lambda e: e.sender))
    )
    with pytest.raises(ProtocolError):
        rnd.clients[1].share_keys(forged)
    assert rnd.clients[1].stage is Stage.ABORTED


def test_too_few_holders_in_a_broadcast_makes_the_client_refuse(rnd):
    server = rnd.server
    for c in rnd.clients.values():
        server.receive(c.advertise_keys())
    out = server.close_stage()
    mine = next(e for e in out[1].entries if e.sender == 1)
    with pytest.raises(RoundAbortedError):
        rnd.clients[1].share_keys(KeysBroadcast(out[1].round_id, 1, (mine, out[1].entries[1])))  # 2 < t=3
    assert _secrets_gone(rnd.clients[1])


# -- unmasking: never reveal both secrets of a client --------------------------------------------------------


def _to_consistency_stage(rnd, updates, weights, skip=()):
    out = _to_masked_stage(rnd)
    for cid, m in out.items():
        if cid not in skip:
            rnd.server.receive(rnd.clients[cid].masked_input(m, update=updates[cid], weight=weights[cid]))
    return rnd.server.close_stage()


def _to_unmask_stage(rnd, updates, weights, skip=()):
    for cid, m in _to_consistency_stage(rnd, updates, weights, skip).items():
        rnd.server.receive(rnd.clients[cid].consistency_check(m))
    return rnd.server.close_stage()


def test_inconsistent_unmask_requests_are_refused(rnd, inputs):
    updates, weights = inputs
    out = _to_unmask_stage(rnd, updates, weights, skip=(6,))
    req = out[1]
    assert req.dropped == (6,)
    rid = rnd.params.round_id
    # Hiding a dropped neighbour, listing the receiver itself as dropped, or leaving it out: all refused.
    everyone_else = tuple(s for s in req.survivors)
    bad_requests = {
        1: UnmaskRequest(rid, 1, everyone_else, (), req.signatures),
        2: UnmaskRequest(rid, 2, tuple(s for s in everyone_else if s != 2), (2, 6), out[2].signatures),
        3: UnmaskRequest(rid, 3, tuple(s for s in everyone_else if s != 3), (6,), out[3].signatures),
    }
    for cid, bad in bad_requests.items():
        client = rnd.clients[cid]
        with pytest.raises(ProtocolError):
            client.unmask(bad)
        assert client.stage is Stage.ABORTED and _secrets_gone(client)
    # Three of five survivors refused; the two honest answers are below t = 3: the round aborts unrevealed.
    for cid in (4, 5):
        rnd.server.receive(rnd.clients[cid].unmask(out[cid]))
    with pytest.raises(RoundAbortedError):
        rnd.server.close_stage()


def test_unmask_response_revealing_the_wrong_shares_is_rejected(rnd, inputs):
    updates, weights = inputs
    out = _to_unmask_stage(rnd, updates, weights, skip=(6,))
    good = rnd.clients[1].unmask(out[1])
    with pytest.raises(ProtocolError):
        rnd.server.receive(
            UnmaskResponse(good.round_id, 1, good.own_seed_share, good.seed_keys[1:], good.key_keys)
        )
    with pytest.raises(ProtocolError):
        rnd.server.receive(UnmaskResponse(good.round_id, 1, good.own_seed_share, good.seed_keys, ()))
    rnd.server.receive(good)
    for cid in (2, 3, 4, 5):
        rnd.server.receive(rnd.clients[cid].unmask(out[cid]))
    rnd.server.close_stage()
    mean, _ = oracle(updates, weights, {1, 2, 3, 4, 5}, 1.0)
    assert np.max(np.abs(rnd.server.result().mean() - mean)) <= rnd.server.result().error_bound


def test_revealed_keys_that_open_nothing_are_refused_and_too_few_left_aborts(rnd, inputs):
    updates, weights = inputs
    out = _to_unmask_stage(rnd, updates, weights, skip=(6,))
    for cid in range(1, 6):
        resp = rnd.clients[cid].unmask(out[cid])
        if cid <= 3:  # three of five holders lie about the key of client 6's mask-key share
            bad = resp.key_keys[0]
            flipped = bytes([bad.key[0] ^ 1]) + bad.key[1:]
            resp = dataclasses.replace(resp, key_keys=(dataclasses.replace(bad, key=flipped),))
            with pytest.raises(ShareVerificationError) as info:
                rnd.server.receive(resp)
            assert info.value.culprit == cid
            continue
        rnd.server.receive(resp)
    assert set(rnd.server.flagged()) == {1, 2, 3}
    assert rnd.server.received() == {4, 5}  # the lies changed nothing
    with pytest.raises(RoundAbortedError):  # two honest answers are below t = 3: nothing is revealed
        rnd.server.close_stage()
    assert rnd.server.stage is Stage.ABORTED


# -- consistency check: one survivor set, vouched for by t holders -------------------------------------------


def _other_set_payload(rnd, survivors):
    from fedfer.security.secagg.messages import consistency_payload

    return consistency_payload(rnd.params.digest, survivors)


def test_server_refuses_forged_or_misdirected_consistency_signatures(rnd, inputs):
    updates, weights = inputs
    out = _to_consistency_stage(rnd, updates, weights, skip=(6,))
    assert out[1].survivors == (1, 2, 3, 4, 5)
    server = rnd.server
    genuine = rnd.clients[1].consistency_check(out[1])
    other_set = rnd.identities[1].sign(_other_set_payload(rnd, (1, 2, 3, 4)))
    for bad in (
        ConsistencySignature(rnd.params.round_id, 1, other_set),  # a signature over another survivor set
        ConsistencySignature(rnd.params.round_id, 1, bytes(64)),  # not a signature at all
        ConsistencySignature(rnd.params.round_id, 2, genuine.signature),  # client 1's signature as client 2's
    ):
        with pytest.raises(IntegrityError):
            server.receive(wire(bad))
    assert server.received() == frozenset()  # nothing was recorded
    with pytest.raises(ProtocolError):
        server.receive(
            wire(ConsistencySignature(rnd.params.round_id, 6, genuine.signature))
        )  # dropped client
    server.receive(wire(genuine))
    with pytest.raises(DuplicateMessageError):
        server.receive(wire(genuine))
    for cid in (2, 3, 4, 5):
        server.receive(wire(rnd.clients[cid].consistency_check(out[cid])))
    server.close_stage()
    _finish_and_check(rnd, updates, weights, {1, 2, 3, 4, 5})


def test_client_signs_one_survivor_set_and_only_a_plausible_one(inputs):
    updates, weights = random_inputs(7, DIM, 5, seed=21)
    rnd = make_round(7, DIM, neighbors=6, threshold=4)
    server = rnd.server
    for c in rnd.clients.values():
        server.receive(c.advertise_keys())
    for cid, m in server.close_stage().items():
        if cid != 7:  # client 7 advertises keys but shares nothing
            server.receive(rnd.clients[cid].share_keys(m))
    out = server.close_stage()
    for cid, m in out.items():
        server.receive(rnd.clients[cid].masked_input(m, update=updates[cid], weight=weights[cid]))
    out = server.close_stage()
    rid = rnd.params.round_id
    refusals = {
        1: (ConsistencyRequest(rid, 1, (2, 3, 4, 5, 6)), ProtocolError),  # the receiver is not in the set
        2: (ConsistencyRequest(rid, 2, (1, 2, 3, 4, 5, 6, 7)), ProtocolError),  # 7 shared nothing with 2
        3: (ConsistencyRequest(rid, 3, (1, 3, 5)), RoundAbortedError),  # fewer than t = 4 holders
    }
    for cid, (request, error) in refusals.items():
        with pytest.raises(error):
            rnd.clients[cid].consistency_check(request)
        assert rnd.clients[cid].stage is Stage.ABORTED and _secrets_gone(rnd.clients[cid])
    signed = rnd.clients[4].consistency_check(out[4])
    assert rnd.clients[4].stage is Stage.UNMASK
    with pytest.raises(ProtocolError):  # a second set is never signed
        rnd.clients[4].consistency_check(ConsistencyRequest(rid, 4, (4, 5, 6)))
    assert rnd.clients[4].stage is Stage.UNMASK  # refused for the stage, not aborted
    assert type(signed) is ConsistencySignature


def test_client_unmasks_only_with_t_valid_signatures_over_the_set_it_signed(rnd, inputs):
    updates, weights = inputs
    out = _to_consistency_stage(rnd, updates, weights, skip=(6,))
    for cid, m in out.items():
        rnd.server.receive(rnd.clients[cid].consistency_check(m))
    requests = rnd.server.close_stage()
    good = requests[1]
    assert [s.signer for s in good.signatures] == [2, 3, 4, 5]
    other_set = _other_set_payload(rnd, (1, 2, 3, 4))
    sig = {s.signer: s for r in requests.values() for s in r.signatures}
    forged = SignedSurvivors(2, bytes(64))
    elsewhere = SignedSurvivors(3, rnd.identities[3].sign(other_set))
    outsider = SignedSurvivors(6, rnd.identities[6].sign(_other_set_payload(rnd, (1, 2, 3, 4, 5))))
    cases = {
        1: ((forged, sig[3]), IntegrityError),  # not a signature
        2: ((sig[1], elsewhere), IntegrityError),  # a signature over another survivor set
        3: ((sig[4],), RoundAbortedError),  # itself + one signature < t = 3
        4: ((sig[5], outsider), ProtocolError),  # 6 is not in the signed set
    }
    for cid, (signatures, error) in cases.items():
        bad = dataclasses.replace(requests[cid], signatures=signatures)
        with pytest.raises(error):
            rnd.clients[cid].unmask(wire(bad))
        assert rnd.clients[cid].stage is Stage.ABORTED and _secrets_gone(rnd.clients[cid])
    # The one client still honest-and-ready answers, but one response is below t: nothing is revealed.
    rnd.server.receive(rnd.clients[5].unmask(requests[5]))
    with pytest.raises(RoundAbortedError):
        rnd.server.close_stage()
