"""Update inversion against ``v``: what a curious aggregator could learn from plain updates, and does not.

Threat model: an honest-but-curious aggregator that knows the global ``v``, the local learning rate, batch
size, number of local steps and clip length, holds public auxiliary clips, and applies analytic label recovery
plus cosine gradient matching (iDLG/LLG + Inverting Gradients, :mod:`tests.privacy.attacks.inversion`) to what
it receives. Features are real MobileNetV2 features of FER2013 faces.

The audit shows the attack works in its favourable setting -- one *plain* FedSGD update (one SGD step on 2
clips) -- so it has teeth; that it degrades on the FedAvg aggregate as more clients contribute; what it gets
from the *plain* update a device really computes (``finetune_v``: Adam, the device's default 2 epochs at
lr 1e-3, batch 16, here on 24 clips); and that on the *masked* SecAgg upload of that real update, which is
what the aggregator actually receives, label recovery is at chance.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedfer.agent.models.video import VideoModel, to_named_arrays
from fedfer.security.keys import IdentityKey
from fedfer.security.secagg import SecAggClient, SecAggParams, SecAggServer, decode_message
from tests.privacy.attacks import (
    GradientInversion,
    frame_similarity,
    label_overlap,
    mean_probabilities,
    rank_labels_by_row_norm,
    recover_label_counts,
    sgd_update,
    split_flat,
    train_video_model,
    update_to_gradient,
)
from tests.privacy.conftest import CLIP_LEN, NUM_CLASSES, FeatureBank

LR = 0.01  # the clients' local learning rate (known to the aggregator)
BATCH = 2  # clips per client update
ATTACK = GradientInversion(steps=200, lr=0.3, seed=7)
AGGREGATE_CLIENTS = (1, 2, 4, 8, 16)  # --audit-full
QUICK_CLIENTS = (1, 4, 16)
DEVICE_CLIPS = 24  # clips in the real fine-tuning update (the device's defaults otherwise)
DEVICE = {"epochs": 2, "lr": 1e-3, "batch_size": 16}


class Scene:
    """The global ``v``, the attacker's public probe clips and a stream of clients' private clips."""

    def __init__(self, bank: FeatureBank) -> None:
        clips, labels = bank.clips(seed=11)
        self.center = bank.mean
        self.pretrain = (clips[:24], labels[:24])
        self.probe = clips[24:40]
        self.private = (clips[40:], labels[40:])
        self.model: VideoModel = train_video_model(
            clips[:24], labels[:24], num_classes=NUM_CLASSES, epochs=5, seed=1
        ).model
        self.mean_probs = mean_probabilities(self.model, self.probe)

    def client_batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``i``'s private batch (disjoint across clients)."""
        clips, labels = self.private
        return clips[i * BATCH : (i + 1) * BATCH], labels[i * BATCH : (i + 1) * BATCH]

    def chance(self, target: np.ndarray, n_clips: int) -> float:
        """Centred best-match similarity of other people's real clips: what knowing the population gives."""
        clips, _ = self.private
        spare = clips[max(AGGREGATE_CLIENTS) * BATCH :]  # never used by any client
        return frame_similarity(target, spare[: max(1, min(n_clips, len(spare)))], center=self.center)

    def attack(self, gradient: dict[str, np.ndarray], batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Label counts and reconstructed clips from a gradient the attacker believes has ``batch`` clips."""
        counts = recover_label_counts(
            gradient, batch_size=batch, num_classes=NUM_CLASSES, mean_probs=self.mean_probs
        )
        labels = np.repeat(np.arange(NUM_CLASSES), counts)
        return counts, ATTACK.reconstruct(self.model, gradient, labels, clip_len=CLIP_LEN)


def _proportional(counts: np.ndarray, total: int) -> np.ndarray:
    """``counts`` scaled to sum to ``total`` (largest remainder): the attacker's guess of one client's mix."""
    raw = counts * (total / counts.sum())
    out = np.floor(raw).astype(np.int64)
    for k in np.argsort(-(raw - out), kind="stable")[: total - int(out.sum())]:
        out[k] += 1
    return out


@pytest.fixture(scope="module")
def scene(feature_bank: FeatureBank) -> Scene:
    return Scene(feature_bank)


def test_plain_single_update_leaks_labels_and_features(scene: Scene, audit_report) -> None:
    """One client's plain update (one SGD step on 2 clips) gives away its labels and its frames."""
    clips, labels = scene.client_batch(0)
    gradient = update_to_gradient(sgd_update(scene.model, clips, labels, lr=LR), lr=LR)
    counts, rec = scene.attack(gradient, BATCH)
    accuracy = label_overlap(labels, counts)
    similarity = frame_similarity(clips, rec, center=scene.center)
    raw_cosine = frame_similarity(clips, rec)
    chance = scene.chance(clips, BATCH)
    audit_report.record(
        "inversion_plain_update",
        batch_clips=BATCH,
        clip_len=CLIP_LEN,
        label_accuracy=accuracy,
        centred_cosine=similarity,
        raw_cosine=raw_cosine,
        chance_centred_cosine=chance,
        steps=ATTACK.steps,
    )
    assert accuracy == 1.0
    assert similarity > chance + 0.15, (similarity, chance)


def test_label_recovery_is_exact_on_plain_updates(scene: Scene) -> None:
    """The analytic part alone recovers every label multiset of a batch of 4 from a plain update."""
    clips, labels = scene.private
    for start in range(0, 24, 4):
        batch_clips, batch_labels = clips[start : start + 4], labels[start : start + 4]
        gradient = update_to_gradient(sgd_update(scene.model, batch_clips, batch_labels, lr=LR), lr=LR)
        counts = recover_label_counts(
            gradient, batch_size=4, num_classes=NUM_CLASSES, mean_probs=scene.mean_probs
        )
        assert label_overlap(batch_labels, counts) >= 0.75
    # The weight-only (iDLG row-norm) variant names the label of a single clip.
    for i in range(6):
        gradient = update_to_gradient(
            sgd_update(scene.model, clips[i : i + 1], labels[i : i + 1], lr=LR), lr=LR
        )
        assert rank_labels_by_row_norm(gradient)[0] == labels[i]


def test_aggregate_degrades_with_more_clients(scene: Scene, audit_report, audit_full: bool) -> None:
    """On the FedAvg mean of n clients' updates, the target client's frames blur into the crowd.

    The attacker inverts the mean gradient as one batch of ``n * BATCH`` clips and is credited with the best
    match for each of the target's frames; its guess of the target's labels is the recovered label mix.
    """
    target_clips, target_labels = scene.client_batch(0)
    figures: dict[str, dict[str, float]] = {}
    sweep = AGGREGATE_CLIENTS if audit_full else QUICK_CLIENTS
    for n in sweep:
        grads = []
        for i in range(n):
            clips, labels = scene.client_batch(i)
            grads.append(update_to_gradient(sgd_update(scene.model, clips, labels, lr=LR), lr=LR))
        mean_grad = {k: np.mean([g[k] for g in grads], axis=0) for k in grads[0]}
        counts, rec = scene.attack(mean_grad, n * BATCH)
        share = _proportional(counts, BATCH)
        figures[str(n)] = {
            "target_centred_cosine": frame_similarity(target_clips, rec, center=scene.center),
            "target_label_accuracy": label_overlap(target_labels, share),
            "chance_centred_cosine": scene.chance(target_clips, n * BATCH),
        }
    audit_report.record("inversion_aggregate", clients=figures, batch_clips_per_client=BATCH)
    single, crowd = figures["1"], figures[str(sweep[-1])]
    assert single["target_label_accuracy"] == 1.0
    assert crowd["target_centred_cosine"] < single["target_centred_cosine"] - 0.1, figures
    # With 16 clients the reconstruction of the target is no better than a crowd of other people's frames.
    assert crowd["target_centred_cosine"] < crowd["chance_centred_cosine"] + 0.1, figures


def _chance_label_accuracy(labels: np.ndarray, *, draws: int = 4000) -> np.ndarray:
    """Label accuracies of guessing the batch's class counts at random (multinomial, uniform over classes)."""
    rng = np.random.default_rng(0)
    return np.array(
        [
            label_overlap(labels, rng.multinomial(len(labels), np.full(NUM_CLASSES, 1 / NUM_CLASSES)))
            for _ in range(draws)
        ]
    )


def _finetune_update(scene: Scene) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], int]:
    """A device's real upload: the change in ``v`` made by ``finetune_v`` on its clips, and its step count."""
    clips, labels = scene.private
    clips, labels = clips[:DEVICE_CLIPS], labels[:DEVICE_CLIPS]  # disjoint from Scene.chance's spare clips
    before = to_named_arrays(scene.model)
    after = to_named_arrays(
        train_video_model(clips, labels, num_classes=NUM_CLASSES, init=before, seed=3, **DEVICE).model
    )
    steps = DEVICE["epochs"] * -(-DEVICE_CLIPS // DEVICE["batch_size"])
    return clips, labels, {n: after[n] - before[n] for n in before}, steps


def test_real_finetune_update(scene: Scene, audit_report) -> None:
    """What the attack gets from the plain update ``finetune_v`` really produces (Adam, 2 epochs, 24 clips).

    The attacker reads the update as ``steps`` SGD steps (gradient ``-delta / (lr * steps)``). Adam divides
    each coordinate by its running RMS, so the output bias moves by about ``lr`` per step *whatever* the
    gradient's size: the analytic label counts, which need that size, and gradient matching, which needs the
    gradient's direction across coordinates, both lose their footing. What honestly holds and is asserted:
    this attack recovers labels no better than guessing and features no better than other people's frames.
    That is a property of this attack, not a guarantee (an Adam-aware, multi-step attack could do better; the
    bias's sign, recorded as ``majority_class_from_bias``, still points at over-represented classes): the
    guarantees are the masked upload (below and ``test_server_view.py``) and DP.
    """
    clips, labels, update, steps = _finetune_update(scene)
    gradient = update_to_gradient(update, lr=DEVICE["lr"] * steps)
    counts, rec = scene.attack(gradient, DEVICE_CLIPS)
    accuracy = label_overlap(labels, counts)
    chance_labels = _chance_label_accuracy(labels)
    similarity = frame_similarity(clips, rec, center=scene.center)
    chance = scene.chance(clips, DEVICE_CLIPS)
    true_counts = np.bincount(labels, minlength=NUM_CLASSES)
    majority = int(np.argmax(update["out.bias"]))
    audit_report.record(
        "inversion_real_finetune_update",
        clips=DEVICE_CLIPS,
        clip_len=CLIP_LEN,
        local_steps=steps,
        **DEVICE,
        label_accuracy=accuracy,
        chance_label_accuracy_mean=float(chance_labels.mean()),
        chance_label_accuracy_p99=float(np.quantile(chance_labels, 0.99)),
        true_counts=true_counts.tolist(),
        recovered_counts=counts.tolist(),
        majority_class_from_bias=bool(true_counts[majority] == true_counts.max()),
        centred_cosine=similarity,
        chance_centred_cosine=chance,
    )
    assert accuracy <= float(np.quantile(chance_labels, 0.99)), (accuracy, counts, true_counts)
    assert similarity < chance, (similarity, chance)


def _masked_upload(update: np.ndarray) -> tuple[SecAggParams, np.ndarray]:
    """Run a real 3-client SecAgg round to the masked-input stage; return the target's masked vector."""
    import os

    params = SecAggParams.create(
        round_id=os.urandom(32),
        num_clients=3,
        dim=len(update),
        neighbors=2,
        threshold=2,
        clip=1.0,
        max_weight=1,
    )
    ids = {i: IdentityKey.generate() for i in (1, 2, 3)}
    roster = {i: k.public_bytes() for i, k in ids.items()}
    server = SecAggServer(params=params, identity_keys=roster)
    clients = {
        i: SecAggClient(params=params, client_id=i, identity_key=ids[i], identity_keys=roster) for i in ids
    }

    def wire(message):  # type: ignore[no-untyped-def]
        return decode_message(message.to_bytes())

    for client in clients.values():
        server.receive(wire(client.advertise_keys()))
    for cid, m in server.close_stage().items():
        server.receive(wire(clients[cid].share_keys(wire(m))))
    rng = np.random.default_rng(5)
    masked = {}
    for cid, m in server.close_stage().items():
        other = np.clip(rng.normal(0.0, 1e-3, len(update)), -1, 1)  # the other clients' own updates
        upload = wire(clients[cid].masked_input(wire(m), update=update if cid == 1 else other, weight=1))
        masked[cid] = upload.vector
    return params, masked[1]


def test_masked_real_update_labels_at_chance(scene: Scene, audit_report) -> None:
    """On the masked upload of the real update, label recovery is no better than guessing at random.

    Teeth: the same recovery on a plain one-step SGD update of the same 24 clips beats every random guess
    but 1 in 100. (The masks are fresh OS randomness each run; the recovery then lands above the 99th
    percentile of random guesses about once in 10,000 runs, by simulation.)
    """
    clips, labels, update, steps = _finetune_update(scene)
    names = [n for n, _ in scene.model.named_parameters()]
    flat = np.concatenate([update[n].ravel() for n in names]).astype(np.float64)
    params, masked = _masked_upload(flat)
    as_update, _ = params.codec().decode_sum(masked)
    gradient = update_to_gradient(split_flat(as_update, scene.model), lr=DEVICE["lr"] * steps)
    counts = recover_label_counts(
        gradient, batch_size=DEVICE_CLIPS, num_classes=NUM_CLASSES, mean_probs=scene.mean_probs
    )
    masked_accuracy = label_overlap(labels, counts)
    plain_sgd = update_to_gradient(sgd_update(scene.model, clips, labels, lr=LR), lr=LR)
    plain_accuracy = label_overlap(
        labels,
        recover_label_counts(
            plain_sgd, batch_size=DEVICE_CLIPS, num_classes=NUM_CLASSES, mean_probs=scene.mean_probs
        ),
    )
    chance = _chance_label_accuracy(labels)
    p99 = float(np.quantile(chance, 0.99))
    audit_report.record(
        "inversion_masked_real_update",
        clips=DEVICE_CLIPS,
        dim=len(flat),
        modulus_bits=params.modulus_bits,
        label_accuracy_masked=masked_accuracy,
        label_accuracy_plain_sgd_same_clips=plain_accuracy,
        chance_label_accuracy_mean=float(chance.mean()),
        chance_label_accuracy_p99=p99,
    )
    assert masked_accuracy <= p99, (masked_accuracy, p99)
    assert plain_accuracy > p99, (plain_accuracy, p99)
