"""Canonical model serialization: one encoding per model, digest checked against an independent oracle."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from fedfer.security.errors import IntegrityError, ValidationError
from fedfer.security.model_codec import decode_model, encode_model, model_digest

VFER_SHAPES = {  # fedfer.agent.models.video.VideoModel (K=6): FC 1280->128, FC 128->64, LSTM(64), linear to 6
    "fc1.weight": (128, 1280),
    "fc1.bias": (128,),
    "fc2.weight": (64, 128),
    "fc2.bias": (64,),
    "lstm.weight_ih_l0": (256, 64),
    "lstm.weight_hh_l0": (256, 64),
    "lstm.bias_ih_l0": (256,),
    "lstm.bias_hh_l0": (256,),
    "out.weight": (6, 64),
    "out.bias": (6,),
}


def vfer(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # test data only, nothing secret
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in VFER_SHAPES.items()}


def test_known_answer_against_independent_oracle() -> None:
    arrays = {"b": np.array([1.5, -2.0], dtype=np.float32), "a": np.zeros((2, 1), dtype=np.float32)}
    enc = encode_model(arrays)
    manifest = '[{"dtype":"float32","name":"a","shape":[2,1]},{"dtype":"float32","name":"b","shape":[2]}]'
    blob = bytes(8) + bytes.fromhex("0000c03f000000c0")  # little-endian float32 1.5, -2.0
    assert enc.manifest == manifest and enc.blob == blob
    oracle = hashlib.sha256(
        b"fedfer-model/v1\x00" + len(manifest).to_bytes(8, "big") + manifest.encode() + blob
    )
    assert enc.digest == oracle.hexdigest() == model_digest(manifest, blob)


def test_round_trip_of_the_video_model() -> None:
    arrays = vfer()
    enc = encode_model(arrays)
    assert len(enc.blob) == 4 * sum(a.size for a in arrays.values()) == 4 * 205_894
    back = decode_model(enc.manifest, enc.blob, enc.digest)
    assert list(back) == sorted(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == np.float32 and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)
        assert not back[name].flags.writeable


def test_encoding_is_canonical() -> None:
    arrays = vfer(1)
    reordered = dict(reversed(list(arrays.items())))
    fortran = {k: np.asfortranarray(v) for k, v in arrays.items()}
    big_endian = {k: v.astype(">f4") for k, v in arrays.items()}
    digests = {encode_model(x).digest for x in (arrays, reordered, fortran, big_endian)}
    assert len(digests) == 1
    assert encode_model(vfer(2)).digest not in digests


def test_tampering_is_detected() -> None:
    enc = encode_model(vfer())
    blob = bytearray(enc.blob)
    blob[1000] ^= 0x01
    with pytest.raises(IntegrityError):
        decode_model(enc.manifest, bytes(blob), enc.digest)
    swapped = enc.manifest.replace("fc1.bias", "fc1.bia0")
    with pytest.raises(IntegrityError):
        decode_model(swapped, enc.blob, enc.digest)
    with pytest.raises(IntegrityError):
        decode_model(enc.manifest, enc.blob, "0" * 64)
    with pytest.raises(IntegrityError):
        decode_model(enc.manifest, enc.blob, "é")


def test_structurally_bad_models_are_refused_even_with_a_matching_digest() -> None:
    def sealed(manifest: str, blob: bytes) -> dict[str, np.ndarray]:
        return decode_model(manifest, blob, model_digest(manifest, blob))

    entry = {"dtype": "float32", "name": "w", "shape": [2]}
    ok = json.dumps([entry], sort_keys=True, separators=(",", ":"))
    assert sealed(ok, bytes(8))["w"].shape == (2,)
    with pytest.raises(ValidationError, match="shorter"):
        sealed(ok, bytes(4))
    with pytest.raises(ValidationError, match="longer"):
        sealed(ok, bytes(12))
    for bad in (
        "{}",
        "[]",
        "not json",
        json.dumps([{**entry, "dtype": "float64"}]),
        json.dumps([{**entry, "shape": [-1]}]),
        json.dumps([{**entry, "shape": [True]}]),
        json.dumps([{**entry, "extra": 1}]),
        json.dumps([entry, entry]),
        json.dumps([{**entry, "name": "b"}, {**entry, "name": "a"}]),
        json.dumps([{**entry, "name": "a b"}]),
    ):
        with pytest.raises(ValidationError):
            sealed(bad, bytes(8))
    with pytest.raises(ValidationError, match="larger"):
        decode_model(ok, bytes(8), model_digest(ok, bytes(8)), max_bytes=4)


def test_encode_refuses_bad_input() -> None:
    good = np.zeros(3, dtype=np.float32)
    for bad in (
        {},
        {"w": np.zeros(3, dtype=np.float64)},
        {"w": [0.0, 1.0]},
        {"w": np.array([np.nan], dtype=np.float32)},
        {"w": np.array([np.inf], dtype=np.float32)},
        {"": good},
        {"a b": good},
        {5: good},
        "w",
    ):
        with pytest.raises(ValidationError):
            encode_model(bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="larger"):
        encode_model({"w": good}, max_bytes=8)
