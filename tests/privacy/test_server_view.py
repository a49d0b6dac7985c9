"""What the aggregator sees in secure aggregation: masked uploads, and what collusion and lies add.

Threat model: the server runs the real SecAgg state machines of ``fedfer.security.secagg`` up to the masked
inputs, records every message, and from then on is malicious: it writes the consistency-check and unmask
requests itself, may tell different clients different survivor sets, and colludes with ``c`` of the target's
share holders, which hand over all their memory (every Shamir share they hold and their identity keys, so the
server can sign anything in their name). The honest clients run the real client state machine, consistency
check included. The honest target uploads a real update of ``v`` (one SGD step on real MobileNetV2 features).

Bounds the parameters give (t-of-h sharing, ``h`` = the target's share holders, itself included):

- Honest-but-curious reporting of dropouts (one survivor set for everyone, even a false one): the target's
  self-mask seed is revealed only by holders told it survived; a lie that it dropped strips its pairwise
  masks, but the ``c <= t - 1`` colluders' seed shares are consistent with every seed, so the vector stays
  one-time padded. With ``c = t`` the coalition reads the update exactly: the bound is tight.
- A server that tells some holders "the target survived" and others "it dropped" (the split view) needs t
  holders on each side; honest holders sign one survivor set and each needs t signatures on its own, so the
  split succeeds exactly when ``c >= 2t - h`` (``SecAggParams.colluders_tolerated_by_lying_server`` =
  ``2t - h - 1``). Tested on both sides of the bound, for the complete graph and for a SecAgg+ graph, with an
  exhaustive search over every way to split the honest clients.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
import pytest

from fedfer.security.crypto import aead_decrypt
from fedfer.security.errors import FedferError, ValidationError
from fedfer.security.keys import AgreementKey, IdentityKey
from fedfer.security.quantize import working_dtype
from fedfer.security.secagg import (
    ConsistencyRequest,
    NeighbourGraph,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    SignedSurvivors,
    UnmaskRequest,
    decode_message,
)
from fedfer.security.secagg._derive import (
    KEY_SHARE,
    OPENING_BYTES,
    SEED_SHARE,
    MaskApplier,
    pairwise_info,
    pairwise_sign,
    seed_of,
    self_mask_key,
    share_ad,
)
from fedfer.security.secagg.messages import consistency_payload
from fedfer.security.shamir import reconstruct_secret
from tests.privacy.attacks import (
    GradientInversion,
    frame_similarity,
    label_overlap,
    mean_probabilities,
    recover_label_counts,
    sgd_update,
    split_flat,
    update_to_gradient,
)
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
    """A SecAgg round run honestly to the masked inputs; the server then turns malicious.

    Args:
        updates: ``{client id: flat float32 update}`` for clients 1..n.
        threshold: t.
        neighbors: graph degree (``None``: the complete graph).
    """

    def __init__(
        self, updates: dict[int, np.ndarray], *, threshold: int, neighbors: int | None = None
    ) -> None:
        n = len(updates)
        self.params = SecAggParams.create(
            round_id=os.urandom(32),
            num_clients=n,
            dim=len(updates[TARGET]),
            neighbors=n - 1 if neighbors is None else neighbors,
            threshold=threshold,
            clip=1.0,
            max_weight=1,
        )
        self.graph = NeighbourGraph(self.params)
        self.identities = {i: IdentityKey.generate() for i in range(1, n + 1)}
        roster = {i: k.public_bytes() for i, k in self.identities.items()}
        self.server = SecAggServer(params=self.params, identity_keys=roster)
        self.clients = {
            i: SecAggClient(
                params=self.params, client_id=i, identity_key=self.identities[i], identity_keys=roster
            )
            for i in self.identities
        }
        self.advertised = {}
        for cid, client in self.clients.items():
            msg = _wire(client.advertise_keys())
            self.advertised[cid] = msg
            self.server.receive(msg)
        self.dealt: dict[int, dict[int, object]] = {}  # owner -> holder -> the ciphertexts the server routed
        for cid, m in self.server.close_stage().items():
            sent = _wire(self.clients[cid].share_keys(_wire(m)))
            self.dealt[cid] = {s.receiver: s for s in sent.shares}
            self.server.receive(sent)
        self.masked: dict[int, np.ndarray] = {}
        for cid, m in self.server.close_stage().items():
            upload = _wire(self.clients[cid].masked_input(_wire(m), update=updates[cid], weight=1))
            self.masked[cid] = upload.vector
            self.server.receive(upload)

    @property
    def everyone(self) -> tuple[int, ...]:
        """All client ids (every masked input arrived)."""
        return tuple(sorted(self.clients))

    def show(self, views: dict[int, tuple[int, ...]], colluders: list[int]) -> dict[int, str]:
        """Run the consistency check and unmask requests with a (possibly different) survivor set per client.

        Honest clients sign the set they are shown (if they accept it), then get an unmask request carrying
        the signatures of their neighbours over that same set: honest ones that signed it, and forgeries in
        the colluders' names. Returns each honest client's answer: ``"revealed"`` or the error it raised.
        """
        signatures: dict[tuple[int, ...], dict[int, bytes]] = {}
        outcome: dict[int, str] = {}
        for cid, survivors in views.items():
            try:
                sig = self.clients[cid].consistency_check(
                    ConsistencyRequest(self.params.round_id, cid, survivors)
                )
            except FedferError as exc:
                outcome[cid] = type(exc).__name__
                continue
            signatures.setdefault(survivors, {})[cid] = sig.signature
        for survivors in set(views.values()):
            payload = consistency_payload(self.params.digest, survivors)
            for c in colluders:
                signatures.setdefault(survivors, {})[c] = self.identities[c].sign(payload)
        self.revealed: dict[int, tuple[dict[int, bytes], dict[int, bytes]]] = {}
        for cid, survivors in views.items():
            if cid in outcome:
                continue
            neighbours = self.graph.neighbors(cid)
            in_set = set(survivors)
            request = UnmaskRequest(
                self.params.round_id,
                cid,
                tuple(sorted(in_set & self.graph.holders(cid))),
                tuple(sorted(neighbours - in_set)),
                tuple(
                    SignedSurvivors(s, sig)
                    for s, sig in sorted(signatures[survivors].items())
                    if s in neighbours
                ),
            )
            try:
                response = _wire(self.clients[cid].unmask(_wire(request)))
            except FedferError as exc:
                outcome[cid] = type(exc).__name__
                continue
            outcome[cid] = "revealed"
            self.revealed[cid] = (
                {s.owner: self.open_share(s.owner, cid, s.key, SEED_SHARE) for s in response.seed_keys}
                | {cid: response.own_seed_share},
                {s.owner: self.open_share(s.owner, cid, s.key, KEY_SHARE) for s in response.key_keys},
            )
        return outcome

    def open_share(self, owner: int, holder: int, key: bytes, kind: int) -> bytes:
        """Decrypt, as the server can once it holds ``key``, the share ``owner`` dealt ``holder``."""
        dealt = self.dealt[owner][holder]
        sealed = dealt.seed_ciphertext if kind == SEED_SHARE else dealt.key_ciphertext  # type: ignore[attr-defined]
        return aead_decrypt(key, sealed, associated_data=share_ad(self.params.digest, owner, holder, kind))

    def shares_of(self, target: int, colluders: list[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Every share of ``target``'s seed opening and mask key the coalition now holds (a colluder hands
        over the keys it holds, which open the ciphertexts the server routed)."""
        held = {c: self.clients[c]._held[target] for c in colluders}
        seed = {c: self.open_share(target, c, k[0], SEED_SHARE) for c, k in held.items()}
        keys = {c: self.open_share(target, c, k[1], KEY_SHARE) for c, k in held.items()}
        for cid, (seeds, mask_keys) in self.revealed.items():
            if target in seeds:
                seed[cid] = seeds[target]
            if target in mask_keys:
                keys[cid] = mask_keys[target]
        return seed, keys

    def strip_pairwise(self, target: int, mask_key_shares: dict[int, bytes]) -> np.ndarray:
        """Remove every pairwise mask from ``target``'s upload using its reconstructed mask key."""
        raw = reconstruct_secret(mask_key_shares, threshold=self.params.threshold, secret_len=32)
        key = AgreementKey.dangerously_import_private_bytes(raw)
        assert key.public_bytes() == self.advertised[target].mask_key
        vector = self.masked[target].copy()
        applier = MaskApplier(length=self.params.vector_length, dtype=working_dtype(self.params.modulus_bits))
        for peer in sorted(self.graph.neighbors(target)):
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

    def read_update(
        self, target: int, seed_shares: dict[int, bytes], key_shares: dict[int, bytes]
    ) -> np.ndarray:
        """With t shares of both secrets: the target's decoded update."""
        stripped = self.strip_pairwise(target, key_shares)
        opening = reconstruct_secret(seed_shares, threshold=self.params.threshold, secret_len=OPENING_BYTES)
        seed = seed_of(opening)
        decoded, weight = self.params.codec().decode_sum(self.strip_self_mask(stripped, seed))
        assert weight == 1
        return decoded


def _chi2_bytes(values: np.ndarray) -> float:
    data = np.ascontiguousarray(values.astype(np.uint32)).view(np.uint8)
    counts = np.bincount(data, minlength=256)
    expected = data.size / 256
    return float(np.sum((counts - expected) ** 2 / expected))


def _ks_uniform(values: np.ndarray, modulus_bits: int) -> float:
    """Kolmogorov-Smirnov distance between the values / 2^k and the uniform distribution on [0, 1)."""
    u = np.sort(values.astype(np.float64) / float(1 << modulus_bits))
    n = u.size
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(max(np.max(ranks / n - u), np.max(u - (ranks - 1) / n)))


def _lag1(values: np.ndarray) -> float:
    x = values.astype(np.float64)
    return float(abs(np.corrcoef(x[:-1], x[1:])[0, 1]))


def _correlation(vector: np.ndarray, plain: np.ndarray) -> float:
    return float(abs(np.corrcoef(vector[:-1].astype(np.float64), plain.astype(np.float64))[0, 1]))


def _updates(population: Population, n: int) -> tuple[dict[int, tuple], dict[int, np.ndarray]]:
    clips, labels = population.pool
    updates, flat = {}, {}
    for cid in range(1, n + 1):
        batch = slice(2 * cid, 2 * cid + 2)
        update = sgd_update(population.model, clips[batch], labels[batch], lr=LR)
        updates[cid] = (clips[batch], labels[batch], update)
        flat[cid] = np.concatenate([update[n].ravel() for n, _ in population.model.named_parameters()])
    return updates, flat


@pytest.fixture(scope="module")
def updates_16(population: Population):
    """Real one-step updates of the central ``v`` for 16 clients, each on its own 2 clips."""
    return _updates(population, 16)


@pytest.fixture(scope="module")
def round_view(updates_16):
    """Five clients upload real updates in a complete-graph round (t = 3)."""
    updates, flat = updates_16
    five = {cid: flat[cid] for cid in range(1, N_CLIENTS + 1)}
    return RoundView(five, threshold=THRESHOLD), updates, flat


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
    ks = _ks_uniform(masked, view.params.modulus_bits)
    # KS critical value at significance 1e-6: sqrt(ln(2 / 1e-6) / (2 n)).
    ks_limit = float(np.sqrt(np.log(2 / 1e-6) / (2 * masked.size)))
    lag1 = _lag1(masked)
    audit_report.record(
        "server_view_masked_upload",
        dim=len(flat[TARGET]),
        modulus_bits=view.params.modulus_bits,
        byte_chi2_255dof=chi2,
        chi2_limit=CHI2_LIMIT_255,
        ks_distance_uint32_vs_uniform=ks,
        ks_limit=ks_limit,
        abs_lag1_autocorrelation=lag1,
        abs_correlation_with_update=corr,
        correlation_limit=6 / np.sqrt(masked.size),
        inversion_centred_cosine=masked_cos,
        inversion_chance_centred_cosine=chance,
        label_accuracy_masked=label_overlap(labels, counts),
        label_accuracy_plain=label_overlap(labels, plain_counts),
    )
    assert chi2 < CHI2_LIMIT_255 and ks < ks_limit and lag1 < 6 / np.sqrt(masked.size)
    # The same tests reject the unmasked (quantized) update: they can fail.
    unmasked = view.params.codec().encode(flat[TARGET], 1)
    assert (
        _ks_uniform(unmasked, view.params.modulus_bits) > ks_limit and _chi2_bytes(unmasked) > CHI2_LIMIT_255
    )
    assert corr < 6 / np.sqrt(masked.size)
    assert masked_cos < chance + 0.05, (masked_cos, chance)
    assert label_overlap(labels, plain_counts) == 1.0  # the same attack reads the plain update


@pytest.mark.parametrize(
    ("graph_kind", "n", "neighbors", "threshold"), [("complete", 5, None, 3), ("secagg+", 16, 6, 4)]
)
def test_server_with_t_minus_1_colluders_learns_nothing(
    round_view, updates_16, graph_kind, n, neighbors, threshold, audit_report
) -> None:
    """Server + t-1 colluding holders, told-everyone-it-dropped lie included: the target stays padded."""
    _, _, flat = round_view
    view = RoundView({cid: flat[cid] for cid in range(1, n + 1)}, threshold=threshold, neighbors=neighbors)
    colluders = sorted(view.graph.neighbors(TARGET))[: threshold - 1]  # among the target's own holders
    honest = [c for c in view.everyone if c != TARGET and c not in colluders]
    without_target = tuple(c for c in view.everyone if c != TARGET)
    outcome = view.show(dict.fromkeys(honest, without_target), colluders)
    assert all(answer == "revealed" for answer in outcome.values()), outcome
    seed_shares, key_shares = view.shares_of(TARGET, colluders)
    stripped = view.strip_pairwise(TARGET, key_shares)
    assert len(seed_shares) == threshold - 1
    with pytest.raises(ValidationError):
        reconstruct_secret(seed_shares, threshold=threshold, secret_len=OPENING_BYTES)
    # Every seed is equally consistent with t-1 shares, so the coalition can only guess one.
    guess = view.strip_self_mask(stripped, os.urandom(32))
    chi2 = _chi2_bytes(stripped)
    corr = _correlation(stripped, flat[TARGET])
    corr_guess = _correlation(guess, flat[TARGET])
    audit_report.record(
        f"server_view_collusion_t_minus_1_{graph_kind.replace('+', '_plus')}",
        clients=n,
        holders_per_client=view.params.holders_per_client,
        threshold=threshold,
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
    fresh = RoundView({cid: flat[cid] for cid in range(1, N_CLIENTS + 1)}, threshold=THRESHOLD)
    colluders = list(range(2, 2 + THRESHOLD))
    honest = [c for c in range(2, N_CLIENTS + 1) if c not in colluders]
    without_target = tuple(c for c in fresh.everyone if c != TARGET)
    fresh.show(dict.fromkeys(honest, without_target), colluders)
    seed_shares, key_shares = fresh.shares_of(TARGET, colluders)
    decoded = fresh.read_update(TARGET, seed_shares, key_shares)
    error = float(np.max(np.abs(decoded - np.clip(flat[TARGET], -1.0, 1.0))))
    audit_report.record(
        "server_view_collusion_t",
        colluders=len(colluders),
        threshold=THRESHOLD,
        max_abs_error_of_recovered_update=error,
    )
    assert error <= 1.0 / fresh.params.codec().scale


# -- the split view: different survivor sets for different holders ------------------------------------------


@dataclass(frozen=True)
class SplitPlan:
    """Which honest clients are told the target survived (side A) and which that it dropped (side B)."""

    side_a: frozenset[int]
    side_b: frozenset[int]


def _split_feasible(graph: NeighbourGraph, t: int, target: int, colluders: set[int], plan: SplitPlan) -> bool:
    """Whether ``plan`` wins t shares of both of the target's secrets (pure counting, no cryptography).

    Side A (the target among them) signs the set with the target, side B the set without; colluders sign
    both. A client reveals only with t signers of its own set among its holders (itself included); side A
    reveals the target's seed share, side B its mask-key share, colluders both.
    """
    signers_a = plan.side_a | colluders
    signers_b = plan.side_b | colluders
    holders = graph.holders(target)
    a_ok = {j for j in plan.side_a & holders if len(signers_a & graph.holders(j)) >= t}
    b_ok = {j for j in plan.side_b & holders if len(signers_b & graph.holders(j)) >= t}
    coll = len(colluders & holders)
    return len(a_ok) + coll >= t and len(b_ok) + coll >= t


def _search_split(
    graph: NeighbourGraph, t: int, target: int, colluders: set[int]
) -> tuple[SplitPlan | None, int]:
    """Try every way to split the honest clients (the target stays on side A); return one that wins."""
    honest = sorted(set(range(1, graph.num_clients + 1)) - colluders - {target})
    tried = 0
    for bits in itertools.product((False, True), repeat=len(honest)):
        tried += 1
        b = frozenset(c for c, on_b in zip(honest, bits, strict=True) if on_b)
        plan = SplitPlan(side_a=frozenset(honest) - b | {target}, side_b=b)
        if _split_feasible(graph, t, target, colluders, plan):
            return plan, tried
    return None, tried


def _best_effort_plan(graph: NeighbourGraph, t: int, target: int, colluders: set[int]) -> SplitPlan:
    """Below the bound no plan wins; this one gives side A exactly a quorum and side B everyone else."""
    honest = sorted(set(range(1, graph.num_clients + 1)) - colluders - {target})
    need_a = max(0, t - 1 - len(colluders))
    return SplitPlan(side_a=frozenset(honest[:need_a]) | {target}, side_b=frozenset(honest[need_a:]))


@pytest.mark.parametrize(
    ("graph_kind", "n", "neighbors", "threshold"),
    [("complete", 7, None, 5), ("secagg+", 16, 6, 5)],
)
def test_split_view_succeeds_exactly_at_2t_minus_h_colluders(
    updates_16, graph_kind, n, neighbors, threshold, audit_report
) -> None:
    """A lying server wins both of the target's secrets iff its colluders among the holders reach 2t - h."""
    _, flat = updates_16
    figures = {}
    for offset in (-1, 0):
        view = RoundView(
            {cid: flat[cid] for cid in range(1, n + 1)}, threshold=threshold, neighbors=neighbors
        )
        params, graph = view.params, view.graph
        bound = 2 * params.threshold - params.holders_per_client
        assert params.colluders_tolerated_by_lying_server == bound - 1
        c = bound + offset
        # Colluders among the target's own holders (the strongest place for them).
        colluders = set(sorted(graph.neighbors(TARGET))[:c])
        plan, tried = _search_split(graph, params.threshold, TARGET, colluders)
        if offset < 0:
            assert plan is None, "a split below the bound must not exist"
            plan = _best_effort_plan(graph, params.threshold, TARGET, colluders)
        assert plan is not None
        with_target = view.everyone
        without_target = tuple(x for x in with_target if x != TARGET)
        views = dict.fromkeys(plan.side_a, with_target) | dict.fromkeys(plan.side_b, without_target)
        outcome = view.show(views, sorted(colluders))
        seed_shares, key_shares = view.shares_of(TARGET, sorted(colluders))
        recovered = len(seed_shares) >= params.threshold and len(key_shares) >= params.threshold
        entry = {
            "clients": n,
            "holders_per_client": params.holders_per_client,
            "threshold": params.threshold,
            "colluders_among_holders": c,
            "splits_tried": tried,
            "refusals": sorted(k for k, v in outcome.items() if v != "revealed"),
            "seed_shares_won": len(seed_shares),
            "mask_key_shares_won": len(key_shares),
            "update_recovered": recovered,
        }
        if recovered:
            decoded = view.read_update(TARGET, seed_shares, key_shares)
            entry["max_abs_error"] = float(np.max(np.abs(decoded - np.clip(flat[TARGET], -1.0, 1.0))))
        figures["below_bound" if offset < 0 else "at_bound"] = entry
        if offset < 0:
            # No split exists (exhaustive search above); the best try leaves one secret below t shares.
            assert not recovered, entry
            if graph_kind == "complete":
                assert set(entry["refusals"]) == set(plan.side_b), entry  # side B lacks a quorum
        else:
            assert recovered, entry
            assert entry["max_abs_error"] <= 1.0 / params.codec().scale
    audit_report.record(
        f"server_view_split_view_{graph_kind.replace('+', '_plus')}",
        bound="a server lying about dropouts needs c >= 2t - h colluding holders; tolerated: 2t - h - 1",
        **figures,
    )
