"""Message types: exact field types, canonical versioned encodings, strict parsing."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfer.security.errors import ProtocolError, ValidationError
from fedfer.security.secagg import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    KeysBroadcast,
    MalformedMessageError,
    MaskedInput,
    RevealedKey,
    SecAggParams,
    ShareKeys,
    SharesBroadcast,
    SignedSurvivors,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
)
from fedfer.security.secagg.messages import SHARE_CIPHERTEXT_BYTES, pack_vector, unpack_vector

RID = b"R" * 32


def _adv(sender: int) -> AdvertiseKeys:
    return AdvertiseKeys(RID, sender, os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(64))


def _ct() -> bytes:
    return os.urandom(SHARE_CIPHERTEXT_BYTES)


def _samples() -> list:
    share = EncryptedShare(1, 2, _ct(), _ct())
    return [
        _adv(3),
        KeysBroadcast(RID, 2, (_adv(1), _adv(2), _adv(5))),
        ShareKeys(RID, 1, (share, EncryptedShare(1, 4, _ct(), _ct()))),
        SharesBroadcast(RID, 2, (share, EncryptedShare(3, 2, _ct(), _ct()))),
        UnmaskResponse(
            RID, 2, os.urandom(66), (RevealedKey(1, os.urandom(32)),), (RevealedKey(4, b"k" * 32),)
        ),
        MaskedInput(RID, 7, 32, np.arange(10, dtype=np.uint32) * 400_000_000),
        ConsistencyRequest(RID, 2, (1, 2, 9, 17)),
        ConsistencySignature(RID, 9, os.urandom(64)),
        UnmaskRequest(
            RID, 2, (1, 2, 9), (4,), (SignedSurvivors(1, os.urandom(64)), SignedSurvivors(9, b"s" * 64))
        ),
        UnmaskResponse(
            RID, 2, os.urandom(66), (RevealedKey(1, os.urandom(32)), RevealedKey(3, os.urandom(32))), ()
        ),
    ]


SAMPLES = len(_samples())


@pytest.mark.parametrize("index", range(SAMPLES))
def test_round_trip_is_exact_and_canonical(index):
    msg = _samples()[index]
    data = msg.to_bytes()
    assert data[:4] == b"FSA\x03"
    back = decode_message(data)
    assert type(back) is type(msg)
    assert back.to_bytes() == data
    assert type(msg).from_bytes(data).to_bytes() == data
    with pytest.raises(MalformedMessageError):
        decode_message(data + b"\x00")  # trailing bytes
    with pytest.raises(MalformedMessageError):
        decode_message(data[:-1])  # truncated
    with pytest.raises(MalformedMessageError):
        decode_message(b"FSA\x02" + data[4:])  # an older, incompatible version
    other = _samples()[(index + 1) % SAMPLES]
    with pytest.raises(MalformedMessageError):
        type(other).from_bytes(data)  # wrong kind


def test_malformed_is_both_protocol_and_validation_error():
    assert issubclass(MalformedMessageError, ProtocolError)
    assert issubclass(MalformedMessageError, ValidationError)
    with pytest.raises(MalformedMessageError):
        decode_message(b"junk")
    with pytest.raises(MalformedMessageError):
        decode_message("FSA")  # type: ignore[arg-type]


def test_exact_field_types_are_enforced():
    with pytest.raises(MalformedMessageError):
        AdvertiseKeys(RID, True, b"a" * 32, b"b" * 32, b"c" * 32, b"s" * 64)  # bool is not an id
    with pytest.raises(MalformedMessageError):
        AdvertiseKeys(RID, 0, b"a" * 32, b"b" * 32, b"c" * 32, b"s" * 64)
    with pytest.raises(MalformedMessageError):
        AdvertiseKeys(RID, 1, bytearray(32), b"b" * 32, b"c" * 32, b"s" * 64)  # type: ignore[arg-type]
    with pytest.raises(MalformedMessageError):
        AdvertiseKeys(RID, 1, b"a" * 32, b"b" * 32, b"c" * 31, b"s" * 64)  # short seed commitment
    with pytest.raises(MalformedMessageError):
        AdvertiseKeys(b"short", 1, b"a" * 32, b"b" * 32, b"c" * 32, b"s" * 64)
    with pytest.raises(MalformedMessageError):
        KeysBroadcast(RID, 1, [_adv(1)])  # type: ignore[arg-type]  # list, not tuple
    with pytest.raises(MalformedMessageError):
        KeysBroadcast(RID, 1, (_adv(2), _adv(1)))  # not increasing
    with pytest.raises(MalformedMessageError):
        KeysBroadcast(RID, 1, (_adv(1), _adv(1)))  # duplicate
    with pytest.raises(MalformedMessageError):
        KeysBroadcast(b"Q" * 32, 1, (_adv(1),))  # entry of another round
    with pytest.raises(MalformedMessageError):
        EncryptedShare(1, 1, _ct(), _ct())  # to itself
    with pytest.raises(MalformedMessageError):
        EncryptedShare(1, 2, _ct(), _ct()[:-1])  # short key-share ciphertext
    with pytest.raises(MalformedMessageError):
        ShareKeys(RID, 2, (EncryptedShare(1, 3, _ct(), _ct()),))  # foreign sender
    with pytest.raises(MalformedMessageError):
        SharesBroadcast(RID, 2, (EncryptedShare(1, 3, _ct(), _ct()),))  # misaddressed
    with pytest.raises(MalformedMessageError):
        UnmaskRequest(RID, 1, (1, 2), (2,), ())  # both survivor and dropped
    with pytest.raises(MalformedMessageError):
        UnmaskRequest(RID, 1, (1, 2.0), (), ())  # type: ignore[arg-type]
    sig = SignedSurvivors(2, b"s" * 64)
    with pytest.raises(MalformedMessageError):
        UnmaskRequest(RID, 1, (1, 2), (), (sig, sig))  # duplicate signer
    with pytest.raises(MalformedMessageError):
        UnmaskRequest(RID, 1, (1, 2), (), ((2, b"s" * 64),))  # type: ignore[arg-type]  # not a record
    with pytest.raises(MalformedMessageError):
        SignedSurvivors(2, b"s" * 63)
    with pytest.raises(MalformedMessageError):
        ConsistencyRequest(RID, 1, (3, 2))  # not increasing
    with pytest.raises(MalformedMessageError):
        ConsistencyRequest(RID, 1, (0, 2))  # not a client id
    with pytest.raises(MalformedMessageError):
        ConsistencySignature(RID, 1, bytearray(64))  # type: ignore[arg-type]
    with pytest.raises(MalformedMessageError):
        UnmaskResponse(RID, 1, b"o" * 66, (RevealedKey(3, b"s" * 32),), (RevealedKey(3, b"k" * 32),))
    with pytest.raises(MalformedMessageError):
        UnmaskResponse(RID, 1, b"o" * 66, (RevealedKey(1, b"s" * 32),), ())  # its own share travels apart
    with pytest.raises(MalformedMessageError):
        UnmaskResponse(RID, 1, b"o" * 65, (), ())
    with pytest.raises(MalformedMessageError):
        RevealedKey(2, b"k" * 31)
    with pytest.raises(MalformedMessageError):
        MaskedInput(RID, 1, 32, np.zeros(5, dtype=np.int64))
    with pytest.raises(MalformedMessageError):
        MaskedInput(RID, 1, 32, np.zeros((2, 3), dtype=np.uint32))
    with pytest.raises(MalformedMessageError):
        MaskedInput(RID, 1, 20, np.full(4, 1 << 20, dtype=np.uint32))  # out of range mod 2^20
    with pytest.raises(MalformedMessageError):
        MaskedInput(RID, 1, 32, [1, 2, 3])  # type: ignore[arg-type]


def test_masked_vector_is_read_only_copy_safe():
    v = np.arange(5, dtype=np.uint32)
    msg = MaskedInput(RID, 1, 32, v)
    with pytest.raises(ValueError):
        msg.vector[0] = 9
    assert v.flags.writeable  # the caller's array is untouched


@pytest.mark.parametrize(("bits", "bpe"), [(8, 1), (12, 2), (20, 3), (32, 4), (33, 5), (48, 6), (62, 8)])
def test_vector_packing_uses_minimal_whole_bytes(bits, bpe):
    rng = np.random.default_rng(bits)
    dtype = np.uint32 if bits <= 32 else np.uint64
    v = (rng.integers(0, 2**62, size=101, dtype=np.uint64) % (1 << bits)).astype(dtype)
    packed = pack_vector(v, bits)
    assert len(packed) == 101 * bpe
    assert np.array_equal(unpack_vector(packed, bits), v)
    msg = MaskedInput(RID, 1, bits, v)
    assert len(msg.to_bytes()) <= 101 * bpe + 64
    assert np.array_equal(MaskedInput.from_bytes(msg.to_bytes()).vector, v)


def test_params_round_trip_and_validation():
    params = SecAggParams.create(round_id=RID, num_clients=50, dim=100, clip=0.5, max_weight=20)
    assert SecAggParams.from_bytes(params.to_bytes()) == params
    assert SecAggParams.from_bytes(params.to_bytes()).digest == params.digest
    for bad in (
        {"neighbors": 7},  # odd sparse degree
        {"neighbors": 50},  # more than n - 1
        {"threshold": 1},
        {"threshold": 40, "neighbors": 10},
        {"clip": 1},  # int, not float
        {"clip": float("nan")},
        {"max_weight": 0},
        {"modulus_bits": 64},
    ):
        kwargs = {"round_id": RID, "num_clients": 50, "dim": 100} | bad
        with pytest.raises(ValidationError):
            SecAggParams.create(**kwargs)
    with pytest.raises(ValidationError):
        SecAggParams.create(round_id=RID, num_clients=1, dim=10)
    with pytest.raises(MalformedMessageError):
        SecAggParams.from_bytes(params.to_bytes()[:-1])


@settings(max_examples=40, deadline=None)
@given(
    index=st.integers(0, SAMPLES - 1),
    cuts=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
)
def test_corrupted_encodings_parse_or_fail_cleanly(index, cuts):
    data = bytearray(_samples()[index].to_bytes())
    for pos, value in cuts:
        if pos < len(data):
            data[pos] = value
        else:
            del data[len(data) // 2 :]
    try:
        msg = decode_message(bytes(data))
    except MalformedMessageError:
        return
    assert decode_message(msg.to_bytes()).to_bytes() == msg.to_bytes()
