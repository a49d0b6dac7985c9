"""Update inversion against ``v``: what a curious aggregator could learn from plain updates, and does not.

Threat model: an honest-but-curious aggregator that knows the global ``v``, the local learning rate, batch
size and clip length, holds public auxiliary clips, and applies analytic label recovery plus cosine gradient
matching (iDLG/LLG + Inverting Gradients, :mod:`agent.attacks.inversion`) to what it receives. Features are
real MobileNetV2 features of FER2013 faces. The audit shows the attack works on one *plain* update (so it has
teeth), fails to chance on the *masked* SecAgg upload the aggregator actually receives, and degrades on the
FedAvg aggregate as more clients contribute.
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.attacks import (
    GradientInversion,
    frame_similarity,
    label_overlap,
    mean_probabilities,
    rank_labels_by_row_norm,
    recover_label_counts,
    sgd_update,
    train_video_model,
    update_to_gradient,
)
from agent.models import VideoModel
from tests.privacy.conftest import CLIP_LEN, NUM_CLASSES, FeatureBank

LR = 0.01  # the clients' local learning rate (known to the aggregator)
BATCH = 2  # clips per client update
ATTACK = GradientInversion(steps=200, lr=0.3, seed=7)
AGGREGATE_CLIENTS = (1, 2, 4, 8, 16)  # --audit-full
QUICK_CLIENTS = (1, 4, 16)


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
