"""Envelope encryption: key handles, DEK wrapping and record sealing with bound associated data."""

from __future__ import annotations

import copy
import pickle
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfer.security import envelope
from fedfer.security.crypto import aead_decrypt
from fedfer.security.envelope import (
    RECORD_OVERHEAD,
    WRAPPED_KEY_BYTES,
    DataKey,
    KeyEncryptionKey,
    RecordKind,
)
from fedfer.security.errors import IntegrityError, ValidationError

CACHE = b"\x11" * 16
SESSION = b"0123456789abcdef0123456789abcdef"
BIND: dict[str, Any] = {"cache_id": CACHE, "session_id": SESSION, "position": 7, "kind": RecordKind.FRAME}


def _dek_from(material: bytes) -> DataKey:
    # Tests only: the private seam that builds a handle from known bytes, to check the wire format.
    return DataKey(envelope._HANDLE_TOKEN, material)


def test_record_wire_format_matches_documented_layout() -> None:
    material = bytes(range(32))
    dek = _dek_from(material)
    blob = dek.encrypt_record(b"hello features", **BIND)
    assert len(blob) == len(b"hello features") + RECORD_OVERHEAD
    assert blob[0] == envelope.FORMAT_VERSION
    # Rebuild the associated data independently from the module docstring's layout and open it directly.
    ad = (
        b"fedfer/envelope/v1/record"
        + b"\x01"
        + bytes([len(CACHE)])
        + CACHE
        + bytes([len(SESSION)])
        + SESSION
        + struct.pack(">QH", 7, RecordKind.FRAME)
    )
    plain = aead_decrypt(material, blob[1:], associated_data=b"\x01" + ad)
    assert plain == b"hello features"


def test_known_answer_vector_pins_the_format() -> None:
    # Fixed key and nonce through the private seam: any silent change of AD layout or header breaks this.
    material = bytes(32)
    nonce = bytes(12)
    ad = envelope._record_ad(CACHE, SESSION, 0, RecordKind.FRAME)
    blob = envelope._seal(material, bytes(16), ad, _random_bytes=lambda n: nonce)
    assert blob[:13] == b"\x01" + nonce
    # AES-256-GCM of 16 zero bytes under the zero key and nonce: the keystream part is the NIST GCM test
    # case 14 ciphertext (associated data changes only the tag).
    assert blob[13:29].hex() == "cea7403d4d606b6e074ec5d3baf39d18"
    assert envelope._open(material, blob, ad) == bytes(16)


def test_round_trip_and_fresh_nonces() -> None:
    dek = DataKey.generate()
    a = dek.encrypt_record(b"x" * 2600, **BIND)
    b = dek.encrypt_record(b"x" * 2600, **BIND)
    assert a != b and a[1:13] != b[1:13]  # a fresh random nonce every time
    assert dek.decrypt_record(a, **BIND) == b"x" * 2600
    assert dek.decrypt_record(b, **BIND) == b"x" * 2600


@pytest.mark.parametrize(
    "field,value",
    [
        ("cache_id", b"\x12" * 16),
        ("session_id", b"fedcba9876543210fedcba9876543210"),
        ("position", 8),
        ("kind", RecordKind.SEAL),
    ],
)
def test_every_bound_field_is_checked(field: str, value: object) -> None:
    dek = DataKey.generate()
    blob = dek.encrypt_record(b"payload", **BIND)
    other = {**BIND, field: value}
    with pytest.raises(IntegrityError) as info:
        dek.decrypt_record(blob, **other)
    assert str(info.value) == "authenticated decryption failed"


def test_tamper_truncate_and_version_are_detected() -> None:
    dek = DataKey.generate()
    blob = dek.encrypt_record(b"payload" * 10, **BIND)
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 0x01
        with pytest.raises(IntegrityError):
            dek.decrypt_record(bytes(flipped), **BIND)
    for cut in (0, 1, 12, 13, RECORD_OVERHEAD - 1, len(blob) - 1):
        with pytest.raises(IntegrityError):
            dek.decrypt_record(blob[:cut], **BIND)
    with pytest.raises(IntegrityError):
        dek.decrypt_record(blob + b"\0", **BIND)


def test_wrong_key_fails_uninformatively() -> None:
    blob = DataKey.generate().encrypt_record(b"payload", **BIND)
    with pytest.raises(IntegrityError) as info:
        DataKey.generate().decrypt_record(blob, **BIND)
    assert str(info.value) == "authenticated decryption failed"
    assert info.value.__cause__ is None


def test_wrap_unwrap_binds_cache_and_session() -> None:
    kek = KeyEncryptionKey.generate()
    dek = DataKey.generate()
    wrapped = kek.wrap_data_key(dek, cache_id=CACHE, session_id=SESSION)
    assert len(wrapped) == WRAPPED_KEY_BYTES
    again = kek.unwrap_data_key(wrapped, cache_id=CACHE, session_id=SESSION)
    record = dek.encrypt_record(b"abc", **BIND)
    assert again.decrypt_record(record, **BIND) == b"abc"
    with pytest.raises(IntegrityError):
        kek.unwrap_data_key(wrapped, cache_id=CACHE, session_id=b"another-session")
    with pytest.raises(IntegrityError):
        kek.unwrap_data_key(wrapped, cache_id=b"another-cache", session_id=SESSION)
    with pytest.raises(IntegrityError):
        KeyEncryptionKey.generate().unwrap_data_key(wrapped, cache_id=CACHE, session_id=SESSION)
    with pytest.raises(IntegrityError):
        kek.unwrap_data_key(wrapped[:-1], cache_id=CACHE, session_id=SESSION)


def test_a_record_blob_is_not_a_wrapped_key() -> None:
    # A 32-byte record sealed under the KEK's own bytes would look like a wrapped key: the labels differ.
    kek = KeyEncryptionKey.generate()
    fake = _dek_from(kek.dangerously_export_plaintext()).encrypt_record(
        bytes(32), cache_id=CACHE, session_id=SESSION, position=0, kind=RecordKind.FRAME
    )
    with pytest.raises(IntegrityError):
        kek.unwrap_data_key(fake, cache_id=CACHE, session_id=SESSION)


def test_handles_are_redacted_unpicklable_and_not_constructible() -> None:
    kek = KeyEncryptionKey.generate()
    dek = DataKey.generate()
    material = kek.dangerously_export_plaintext()
    for handle in (kek, dek):
        text = repr(handle) + str(handle)
        assert "redacted" in text
        assert material.hex() not in text and dek._material.hex() not in text
        with pytest.raises(TypeError):
            pickle.dumps(handle)
        with pytest.raises(TypeError):
            copy.copy(handle)
        with pytest.raises(TypeError):
            copy.deepcopy(handle)
        assert not hasattr(handle, "__dict__")
    with pytest.raises(TypeError):
        KeyEncryptionKey(object(), material)
    with pytest.raises(TypeError):
        DataKey(object(), material)


def test_import_export_and_fingerprint() -> None:
    kek = KeyEncryptionKey.generate()
    material = kek.dangerously_export_plaintext()
    same = KeyEncryptionKey.dangerously_import_plaintext(material)
    assert same.fingerprint == kek.fingerprint
    assert KeyEncryptionKey.generate().fingerprint != kek.fingerprint
    assert material.hex() not in kek.fingerprint and len(kek.fingerprint) == 32
    wrapped = kek.wrap_data_key(DataKey.generate(), cache_id=CACHE, session_id=SESSION)
    same.unwrap_data_key(wrapped, cache_id=CACHE, session_id=SESSION)
    for bad in (b"", b"\0" * 31, b"\0" * 33, bytearray(32), "0" * 32):
        with pytest.raises(ValidationError):
            KeyEncryptionKey.dangerously_import_plaintext(bad)  # type: ignore[arg-type]


def test_malformed_arguments_are_validation_errors() -> None:
    dek = DataKey.generate()
    bad_bindings = [
        {**BIND, "cache_id": b""},
        {**BIND, "cache_id": "text"},
        {**BIND, "session_id": b"x" * 256},
        {**BIND, "position": -1},
        {**BIND, "position": True},
        {**BIND, "position": 1.0},
        {**BIND, "kind": 99},
    ]
    for binding in bad_bindings:
        with pytest.raises(ValidationError):
            dek.encrypt_record(b"x", **binding)
    with pytest.raises(ValidationError):
        dek.encrypt_record("not bytes", **BIND)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        KeyEncryptionKey.generate().wrap_data_key("dek", cache_id=CACHE, session_id=SESSION)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    plaintext=st.binary(max_size=3000),
    position=st.integers(min_value=0, max_value=2**63 - 1),
    flip=st.integers(min_value=0),
)
def test_property_round_trip_and_any_bit_flip_fails(plaintext: bytes, position: int, flip: int) -> None:
    dek = DataKey.generate()
    binding = {**BIND, "position": position}
    blob = dek.encrypt_record(plaintext, **binding)
    assert dek.decrypt_record(blob, **binding) == plaintext
    bit = flip % (8 * len(blob))
    tampered = bytearray(blob)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError):
        dek.decrypt_record(bytes(tampered), **binding)
