"""What the aggregator sees in secure aggregation: masked uploads, and what collusion with clients adds.

Threat model: an honest-but-curious server that runs H1's real SecAgg state machines (``security.secagg``),
records every message, may lie to every client that a given client dropped after it uploaded (the
dropped-client path), and colludes with ``k`` clients that hand over all their memory (every Shamir share they
hold). The honest target uploads a real update of ``v`` (one SGD step on real MobileNetV2 features).

Bound the parameters give: the target's self-mask seed ``b_u`` is Shamir-shared ``t``-of-``n``; the coalition
holds ``k`` of its shares. With ``k <= t - 1`` those shares are consistent with every possible seed, so even
after removing every pairwise mask (which the dropped-client lie lets it do) the target's vector stays
one-time-padded by ``PRG(b_u)``. With ``k = t`` it reconstructs ``b_u`` and reads the update exactly: the
bound is tight.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from agent.attacks import (
    GradientInversion,
    frame_similarity,
    label_overlap,
    mean_probabilities,
    recover_label_counts,
    sgd_update,
    split_flat,
    update_to_gradient,
)
from security.errors import ValidationError
from security.keys import AgreementKey, IdentityKey
from security.quantize import working_dtype
from security.secagg import SecAggClient, SecAggParams, SecAggServer, UnmaskRequest, decode_message
from security.secagg._derive import MaskApplier, pairwise_info, pairwise_sign, self_mask_key
from security.shamir import reconstruct_secret
from tests.privacy.conftest import CLIP_LEN, NUM_CLASSES, Population

LR = 0.01
N_CLIENTS = 5
THRESHOLD = 3
TARGET = 1
# Chi-square of 256 byte counts (255 degrees of freedom): mean 255, sd 22.6; 420 is > 7 sd above.
CHI2_LIMIT_255 = 420.0


def _wire(message):
    return decode_message(message.to_bytes())


class RoundView:
    """A SecAgg round run to the masked-input stage, with everything the server has recorded."""

    def __init__(self, updates: dict[int, np.ndarray]) -> None:
        dim = len(updates[TARGET])
        self.params = SecAggParams.create(
            round_id=os.urandom(32),
            num_clients=N_CLIENTS,
            dim=dim,
            neighbors=N_CLIENTS - 1,
            threshold=THRESHOLD,
            clip=1.0,
            max_weight=1,
        )
        ids = {i: IdentityKey.generate() for i in range(1, N_CLIENTS + 1)}
        roster = {i: k.public_bytes() for i, k in ids.items()}
        self.server = SecAggServer(params=self.params, identity_keys=roster)
        self.clients = {
            i: SecAggClient(params=self.params, client_id=i, identity_key=ids[i], identity_keys=roster)
            for i in ids
        }
        self.advertised = {}
        for cid, client in self.clients.items():
            msg = _wire(client.advertise_keys())
            self.advertised[cid] = msg
            self.server.receive(msg)
        for cid, m in self.server.close_stage().items():
            self.server.receive(_wire(self.clients[cid].share_keys(_wire(m))))
        self.masked: dict[int, np.ndarray] = {}
        for cid, m in self.server.close_stage().items():
            upload = _wire(self.clients[cid].masked_input(_wire(m), update=updates[cid], weight=1))
            self.masked[cid] = upload.vector
            self.server.receive(upload)

    def claim_dropped(self, target: int, honest: list[int]) -> dict[int, bytes]:
        """The server's lie: tell every honest client ``target`` dropped; collect its mask-key shares."""
        survivors = tuple(sorted(set(self.clients) - {target}))
        shares: dict[int, bytes] = {}
        for cid in honest:
            request = UnmaskRequest(self.params.round_id, cid, survivors, (target,))
            response = _wire(self.clients[cid].unmask(_wire(request)))
            shares.update((cid, s.share) for s in response.key_shares if s.owner == target)
        return shares

    def strip_pairwise(self, target: int, mask_key_shares: dict[int, bytes]) -> np.ndarray:
        """Remove every pairwise mask from ``target``'s upload using its reconstructed mask key."""
        raw = reconstruct_secret(mask_key_shares, threshold=THRESHOLD, secret_len=32)
        key = AgreementKey.from_private_bytes_DANGEROUS(raw)
        assert key.public_bytes() == self.advertised[target].mask_key
        vector = self.masked[target].copy()
        applier = MaskApplier(length=self.params.vector_length, dtype=working_dtype(self.params.modulus_bits))
        for peer in sorted(set(self.clients) - {target}):
            seed = key.derive(
                self.advertised[peer].mask_key, info=pairwise_info(target, peer), salt=self.params.digest
            )
            applier.apply(vector, seed, -pairwise_sign(target, peer))
        return vector

    def strip_self_mask(self, vector: np.ndarray, seed: bytes) -> np.ndarray:
        """Remove the self mask derived from ``seed``."""
        out = vector.copy()
        applier = MaskApplier(length=self.params.vector_length, dtype=working_dtype(self.params.modulus_bits))
        applier.apply(out, self_mask_key(seed, self.params.digest), -1)
        return out


def _chi2_bytes(values: np.ndarray) -> float:
    data = np.ascontiguousarray(values.astype(np.uint32)).view(np.uint8)
    counts = np.bincount(data, minlength=256)
    expected = data.size / 256
    return float(np.sum((counts - expected) ** 2 / expected))


def _correlation(vector: np.ndarray, plain: np.ndarray) -> float:
    return float(abs(np.corrcoef(vector[:-1].astype(np.float64), plain.astype(np.float64))[0, 1]))


@pytest.fixture(scope="module")
def round_view(population: Population):
    """Five clients upload real one-step updates of the central ``v`` on their own 2 clips."""
    clips, labels = population.pool
    updates, flat = {}, {}
    for cid in range(1, N_CLIENTS + 1):
        batch = slice(2 * cid, 2 * cid + 2)
        update = sgd_update(population.model, clips[batch], labels[batch], lr=LR)
        updates[cid] = (clips[batch], labels[batch], update)
        flat[cid] = np.concatenate([update[n].ravel() for n, _ in population.model.named_parameters()])
    return RoundView(flat), updates, flat


def test_masked_upload_is_uniform_uncorrelated_and_uninvertible(
    round_view, population: Population, feature_bank, audit_report
) -> None:
    """The target's masked upload: uniform bytes, no correlation with its update, inversion at chance."""
    view, updates, flat = round_view
    masked = view.masked[TARGET]
    chi2 = _chi2_bytes(masked)
    corr = _correlation(masked, flat[TARGET])
    # Read the upload as if it were an update (dequantize with the round's codec) and attack it.
    as_update, _ = view.params.codec().decode_sum(masked)
    clips, labels, plain = updates[TARGET]
    gradient = update_to_gradient(split_flat(as_update, population.model), lr=LR)
    probe = population.pool[0][40:56]
    counts = recover_label_counts(
        gradient,
        batch_size=2,
        num_classes=NUM_CLASSES,
        mean_probs=mean_probabilities(population.model, probe),
    )
    attack = GradientInversion(steps=200, lr=0.3, seed=7)
    rec = attack.reconstruct(
        population.model, gradient, np.repeat(np.arange(NUM_CLASSES), counts), clip_len=CLIP_LEN
    )
    masked_cos = frame_similarity(clips, rec, center=feature_bank.mean)
    chance = frame_similarity(clips, population.pool[0][56:58], center=feature_bank.mean)
    plain_counts = recover_label_counts(
        update_to_gradient(plain, lr=LR),
        batch_size=2,
        num_classes=NUM_CLASSES,
        mean_probs=mean_probabilities(population.model, probe),
    )
    audit_report.record(
        "server_view_masked_upload",
        dim=len(flat[TARGET]),
        modulus_bits=view.params.modulus_bits,
        byte_chi2_255dof=chi2,
        chi2_limit=CHI2_LIMIT_255,
        abs_correlation_with_update=corr,
        correlation_limit=6 / np.sqrt(masked.size),
        inversion_centred_cosine=masked_cos,
        inversion_chance_centred_cosine=chance,
        label_accuracy_masked=label_overlap(labels, counts),
        label_accuracy_plain=label_overlap(labels, plain_counts),
    )
    assert chi2 < CHI2_LIMIT_255
    assert corr < 6 / np.sqrt(masked.size)
    assert masked_cos < chance + 0.05, (masked_cos, chance)
    assert label_overlap(labels, plain_counts) == 1.0  # the same attack reads the plain update


def test_server_with_t_minus_1_colluders_learns_nothing(round_view, audit_report) -> None:
    """Server + t-1 colluding clients, dropped-client lie included: the target's vector stays padded."""
    view, _, flat = round_view
    colluders = list(range(2, 2 + THRESHOLD - 1))
    honest = [c for c in range(2, N_CLIENTS + 1) if c not in colluders]
    key_shares = view.claim_dropped(TARGET, honest)
    key_shares.update({c: view.clients[c]._held[TARGET][1] for c in colluders})  # colluders dump memory
    stripped = view.strip_pairwise(TARGET, key_shares)
    seed_shares = {c: view.clients[c]._held[TARGET][0] for c in colluders}
    assert len(seed_shares) == THRESHOLD - 1
    with pytest.raises(ValidationError):
        reconstruct_secret(seed_shares, threshold=THRESHOLD, secret_len=32)
    # Every seed is equally consistent with t-1 shares, so the coalition can only guess one.
    guess = view.strip_self_mask(stripped, os.urandom(32))
    chi2 = _chi2_bytes(stripped)
    corr = _correlation(stripped, flat[TARGET])
    corr_guess = _correlation(guess, flat[TARGET])
    audit_report.record(
        "server_view_collusion_t_minus_1",
        clients=N_CLIENTS,
        threshold=THRESHOLD,
        colluders=len(colluders),
        seed_shares_held=len(seed_shares),
        byte_chi2_after_removing_pairwise_masks=chi2,
        abs_correlation_after_removing_pairwise_masks=corr,
        abs_correlation_with_forged_seed=corr_guess,
        bound="t-1 Shamir shares of the self-mask seed are consistent with every seed: zero information",
    )
    limit = 6 / np.sqrt(stripped.size)
    assert chi2 < CHI2_LIMIT_255
    assert corr < limit and corr_guess < limit


def test_server_with_t_colluders_reads_the_update_bound_is_tight(round_view, audit_report) -> None:
    """With t colluders in the same dropped-client path the coalition recovers the update exactly."""
    _, _, flat = round_view
    fresh = RoundView(flat)  # a new round: the earlier round's honest clients have finished
    colluders = list(range(2, 2 + THRESHOLD))
    honest = [c for c in range(2, N_CLIENTS + 1) if c not in colluders]
    key_shares = fresh.claim_dropped(TARGET, honest)
    key_shares.update({c: fresh.clients[c]._held[TARGET][1] for c in colluders})
    stripped = fresh.strip_pairwise(TARGET, key_shares)
    seed_shares = {c: fresh.clients[c]._held[TARGET][0] for c in colluders}
    seed = reconstruct_secret(seed_shares, threshold=THRESHOLD, secret_len=32)
    plain = fresh.strip_self_mask(stripped, seed)
    decoded, weight = fresh.params.codec().decode_sum(plain)
    error = float(np.max(np.abs(decoded - np.clip(flat[TARGET], -1.0, 1.0))))
    audit_report.record(
        "server_view_collusion_t",
        colluders=len(colluders),
        threshold=THRESHOLD,
        recovered_weight=weight,
        max_abs_error_of_recovered_update=error,
    )
    assert weight == 1
    assert error <= 1.0 / fresh.params.codec().scale
