"""The server's view of one client (its masked vector) is uniform mod 2^k and uncorrelated with its update."""

from __future__ import annotations

import numpy as np
import pytest

from tests.security.secagg_harness import make_round, wire

DIM = 40_000
# Chi-square with 255 degrees of freedom: mean 255, sd ~22.6; 420 is > 7 sd (p < 1e-10).
CHI2_LIMIT_255 = 420.0


def _masked_vector(update: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run a 3-client round to the masked-input stage; return client 1's (masked vector, encoded input)."""
    rnd = make_round(3, DIM, neighbors=2, threshold=2, max_weight=4)
    server = rnd.server
    for c in rnd.clients.values():
        server.receive(wire(c.advertise_keys()))
    for cid, m in server.close_stage().items():
        server.receive(wire(rnd.clients[cid].share_keys(wire(m))))
    out = server.close_stage()
    msg = wire(rnd.clients[1].masked_input(wire(out[1]), update=update, weight=3))
    encoded = rnd.params.codec().encode(update, 3)
    return msg.vector.astype(np.uint64), encoded.astype(np.uint64)


def _chi2_bytes(values: np.ndarray, shift: int) -> float:
    counts = np.bincount(((values >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.int64), minlength=256)
    expected = values.size / 256
    return float(np.sum((counts - expected) ** 2 / expected))


UPDATES = {
    "zeros": np.zeros(DIM, dtype=np.float32),
    "max": np.full(DIM, 1.0, dtype=np.float32),
    "ramp": np.linspace(-1.0, 1.0, DIM, dtype=np.float32),
}


@pytest.mark.parametrize("name", sorted(UPDATES))
def test_masked_vector_is_uniform_and_uncorrelated(name):
    update = UPDATES[name]
    masked, encoded = _masked_vector(update)
    n = masked.size
    for shift in (0, 8, 16, 24):  # every byte of the 32-bit words is uniform
        assert _chi2_bytes(masked, shift) < CHI2_LIMIT_255
    bits = (masked[:, None] >> np.arange(32, dtype=np.uint64)) & np.uint64(1)
    assert np.max(np.abs(bits.mean(axis=0) - 0.5)) < 6 * 0.5 / np.sqrt(n)
    mean = masked.astype(np.float64).mean() / 2**32
    assert abs(mean - 0.5) < 6 * np.sqrt(1 / 12 / n)
    # Uncorrelated with the plaintext, both as signed fixed-point values and as raw residues.
    signed = np.where(encoded >= 2**31, encoded.astype(np.float64) - 2**32, encoded.astype(np.float64))
    limit = 6 / np.sqrt(n)
    if np.std(signed) > 0:
        assert abs(np.corrcoef(masked.astype(np.float64), signed)[0, 1]) < limit
    if np.std(encoded.astype(np.float64)) > 0:
        assert abs(np.corrcoef(masked.astype(np.float64), encoded.astype(np.float64))[0, 1]) < limit
    # The masked value minus the plaintext is also uniform (the mask hides every residue equally).
    assert _chi2_bytes((masked - encoded) & np.uint64(0xFFFFFFFF), 24) < CHI2_LIMIT_255


def test_views_of_different_updates_are_indistinguishable():
    a, _ = _masked_vector(UPDATES["zeros"])
    b, _ = _masked_vector(UPDATES["max"])
    # Two-sample chi-square on the top byte: same distribution whatever the update was.
    ca = np.bincount((a >> np.uint64(24)).astype(np.int64), minlength=256).astype(np.float64)
    cb = np.bincount((b >> np.uint64(24)).astype(np.int64), minlength=256).astype(np.float64)
    stat = float(np.sum((ca - cb) ** 2 / (ca + cb)))
    assert stat < CHI2_LIMIT_255
    # Sanity check of the test itself: an unmasked view is wildly non-uniform and fails the same check.
    _, plain = _masked_vector(UPDATES["max"])
    assert _chi2_bytes(plain, 24) > 10 * CHI2_LIMIT_255
