"""Known-answer and negative tests for the crypto wrappers and key handles."""

from __future__ import annotations

import copy
import pickle

import pytest

from fedfer.security.crypto import Keystream, aead_decrypt, aead_encrypt, hkdf_sha256, sha256
from fedfer.security.errors import IntegrityError, ValidationError
from fedfer.security.keys import AgreementKey, IdentityKey, verify_signature


def test_hkdf_rfc5869_test_case_1():
    okm = hkdf_sha256(
        bytes.fromhex("0b" * 22),
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        length=42,
    )
    assert okm == bytes.fromhex(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_rfc5869_test_case_2():
    okm = hkdf_sha256(
        bytes(range(0x00, 0x50)),
        salt=bytes(range(0x60, 0xB0)),
        info=bytes(range(0xB0, 0x100)),
        length=82,
    )
    assert okm == bytes.fromhex(
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09"
        "da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87"
    )


def test_hkdf_requires_info_label():
    with pytest.raises(ValidationError):
        hkdf_sha256(b"k" * 32, info=b"")
    with pytest.raises(ValidationError):
        hkdf_sha256(b"k" * 32, info="label")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        hkdf_sha256(b"k" * 32, info=b"x", length=0)


def test_sha256_known_answer():
    assert sha256(b"abc") == bytes.fromhex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_chacha20_keystream_rfc8439_a1_vector_1():
    # RFC 8439 appendix A.1, test vector #1: all-zero key, nonce and counter.
    stream = bytes(Keystream(nbytes=64, algorithm="chacha20").generate(bytes(32)))
    assert stream == bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )


def test_aes256_ctr_keystream_first_block_is_aes_of_zero_counter():
    # AES-256 with an all-zero key on the all-zero block (the counter block 0) is a published value.
    stream = bytes(Keystream(nbytes=16).generate(bytes(32)))
    assert stream == bytes.fromhex("dc95c078a2408989ad48a21492842087")


def test_keystream_is_deterministic_per_key_and_differs_between_keys():
    ks = Keystream(nbytes=1000)
    a = bytes(ks.generate(b"\x01" * 32))
    b = bytes(ks.generate(b"\x01" * 32))
    c = bytes(ks.generate(b"\x02" * 32))
    assert a == b and a != c and len(a) == 1000
    with pytest.raises(ValidationError):
        ks.generate(b"short")
    with pytest.raises(ValidationError):
        Keystream(nbytes=10, algorithm="rc4")


def test_aead_round_trip_and_tampering():
    key = b"K" * 32
    sealed = aead_encrypt(key, b"secret share", associated_data=b"round|1|2")
    assert aead_decrypt(key, sealed, associated_data=b"round|1|2") == b"secret share"
    with pytest.raises(IntegrityError):
        aead_decrypt(key, sealed, associated_data=b"round|1|3")
    flipped = bytearray(sealed)
    flipped[20] ^= 1
    with pytest.raises(IntegrityError):
        aead_decrypt(key, bytes(flipped), associated_data=b"round|1|2")
    with pytest.raises(IntegrityError):
        aead_decrypt(b"L" * 32, sealed, associated_data=b"round|1|2")
    with pytest.raises(IntegrityError):
        aead_decrypt(key, sealed[:10], associated_data=b"round|1|2")


def test_aead_requires_associated_data_and_uses_fresh_nonces():
    with pytest.raises(ValidationError):
        aead_encrypt(b"K" * 32, b"x", associated_data=b"")
    with pytest.raises(ValidationError):
        aead_encrypt(b"K" * 31, b"x", associated_data=b"ad")
    assert aead_encrypt(b"K" * 32, b"x", associated_data=b"ad") != aead_encrypt(
        b"K" * 32, b"x", associated_data=b"ad"
    )


def test_aead_random_seam_gives_fixed_vectors():
    fixed = aead_encrypt(b"K" * 32, b"x", associated_data=b"ad", _random_bytes=lambda n: b"\x00" * n)
    assert fixed == aead_encrypt(b"K" * 32, b"x", associated_data=b"ad", _random_bytes=lambda n: b"\x00" * n)
    assert fixed[:12] == bytes(12)


def test_identity_key_sign_verify_and_errors():
    key = IdentityKey.generate()
    sig = key.sign(b"message")
    verify_signature(key.public_bytes(), b"message", sig)
    with pytest.raises(IntegrityError):
        verify_signature(key.public_bytes(), b"messagE", sig)
    with pytest.raises(IntegrityError):
        verify_signature(IdentityKey.generate().public_bytes(), b"message", sig)
    with pytest.raises(IntegrityError):
        verify_signature(key.public_bytes(), b"message", sig[:-1])


def test_rfc8032_ed25519_test_1_via_dangerous_loader():
    key = IdentityKey.dangerously_import_private_bytes(
        bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    )
    assert key.public_bytes() == bytes.fromhex(
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert key.sign(b"") == bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


def test_rfc7748_x25519_agreement_matches_between_parties():
    alice = AgreementKey.dangerously_import_private_bytes(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob = AgreementKey.dangerously_import_private_bytes(
        bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    )
    assert alice.public_bytes() == bytes.fromhex(
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    # RFC 7748 section 6.1 shared secret, then HKDF with our label on both sides.
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    expected = hkdf_sha256(shared, info=b"test", salt=b"s")
    assert alice.derive(bob.public_bytes(), info=b"test", salt=b"s") == expected
    assert bob.derive(alice.public_bytes(), info=b"test", salt=b"s") == expected
    with pytest.raises(IntegrityError):
        alice.derive(bytes(32), info=b"test")  # low-order point: all-zero shared secret is refused
    with pytest.raises(ValidationError):
        alice.derive(b"short", info=b"test")


@pytest.mark.parametrize("factory", [IdentityKey.generate, AgreementKey.generate])
def test_key_handles_refuse_pickling_copying_and_hide_material(factory):
    key = factory()
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        copy.copy(key)
    with pytest.raises(TypeError):
        copy.deepcopy(key)
    raw = key.dangerously_export_private_bytes()
    assert raw.hex() not in repr(key) and "redacted" in repr(key)
    with pytest.raises(TypeError):
        type(key)(None, None)  # no public constructor


def test_key_generation_seam_and_bad_raw_keys():
    a = IdentityKey.generate(_random_bytes=lambda n: b"\x07" * n)
    b = IdentityKey.generate(_random_bytes=lambda n: b"\x07" * n)
    assert a.public_bytes() == b.public_bytes()
    with pytest.raises(ValidationError):
        IdentityKey.dangerously_import_private_bytes(b"short")
    with pytest.raises(ValidationError):
        AgreementKey.dangerously_import_private_bytes(b"x" * 33)
