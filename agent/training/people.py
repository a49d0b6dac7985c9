"""Personalization and FedAvg measured on real people: the per-person protocol of a labelled corpus.

Each person is one device. Their clips (:class:`PersonClips`) are split into an unlabelled adaptation set and
a labelled test set (for the Taiwanese corpus by performance type, :mod:`fedfer.agent.training.taiwanese`).

* :func:`personalize_people`: every person personalizes the central v on their own adaptation clips with a
  :class:`Method` (the device's own code, :func:`fedfer.agent.learning.personalize.personalize`), and both
  models are scored on the person's test clips: per person (micro F1, the paper's Fig. 3) and pooled over
  people (per-class precision/recall/F1, macro and micro: the paper's Table 2), at clip and at image level.
* :func:`secure_fedavg`: rounds of FedAvg over federating people through the project's own secure
  aggregation (the client and server state machines of :mod:`fedfer.security.secagg`, in process, with the
  device's update encoding and optional user-level DP of :mod:`fedfer.agent.learning.update`); the new
  central v is scored on people who took no part (the paper's Table 6).

A clip's frames are scored together by v (clip level); image level scores every frame as a clip of its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfer.agent.errors import DatasetError
from fedfer.agent.learning.dp import DPConfig
from fedfer.agent.learning.personalize import (
    PersonalizeConfig,
    PersonalizeResult,
    pad_clips,
    personalize,
    predict_clips,
)
from fedfer.agent.learning.update import RoundDPConfig, apply_update, round_contribution
from fedfer.agent.models.video import VideoModel, from_named_arrays, to_named_arrays
from fedfer.agent.records import CLASS_SETS
from fedfer.agent.training.metrics import classification_report, subject_deltas
from fedfer.security.dp import gaussian_epsilon
from fedfer.security.keys import IdentityKey
from fedfer.security.secagg import SecAggClient, SecAggParams, SecAggServer, decode_message

__all__ = [
    "METHODS",
    "Clip",
    "Method",
    "PersonClips",
    "adapt",
    "personalize_people",
    "score",
    "secure_fedavg",
]


@dataclass(frozen=True, slots=True)
class Clip:
    """One clip of a person: per-frame features ``(T, 1280)`` and IFER probabilities ``(T, K)``, its label."""

    features: np.ndarray
    probs: np.ndarray
    label: int


@dataclass(frozen=True, slots=True)
class PersonClips:
    """A person's unlabelled adaptation clips (labels kept only for reporting) and labelled test clips."""

    person: str
    adapt: tuple[Clip, ...]
    test: tuple[Clip, ...]


@dataclass(frozen=True, slots=True)
class Method:
    """A personalization method: the device's :class:`PersonalizeConfig`, named for reports."""

    name: str
    config: PersonalizeConfig
    description: str


#: The methods the benchmark compares. ``paper`` is Salman & Busso's (ICMI 2022): mean IFER probabilities per
#: clip, at most P = 50 clips per class at confidence >= 0.5, all of v fine-tuned 2 epochs at lr 1e-3.
#: ``biases`` keeps that selection and adapts only v's bias vectors (the person's feature offset and class
#: prior) for 10 epochs at lr 1e-2: chosen on dev performers (docs/learning.md).
METHODS: dict[str, Method] = {
    "paper": Method(
        "paper", PersonalizeConfig(), "pseudo labels, top-50/class at p>=0.5, all of v, 2 ep, 1e-3"
    ),
    "biases": Method(
        "biases",
        PersonalizeConfig(train="biases", epochs=10, lr=1e-2),
        "pseudo labels, top-50/class at p>=0.5, v's biases only, 10 ep, 1e-2",
    ),
}


def adapt(
    person: PersonClips,
    central: Mapping[str, np.ndarray],
    *,
    num_classes: int,
    method: Method,
    dp: DPConfig | None = None,
) -> tuple[VideoModel, PersonalizeResult]:
    """The device's personalization of ``central`` on ``person``'s unlabelled adaptation clips."""
    return personalize(
        central,
        [c.features for c in person.adapt],
        [c.probs for c in person.adapt],
        num_classes=num_classes,
        config=method.config,
        dp=dp,
    )


def score(v: VideoModel, clips: Sequence[Clip]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"clip": (labels, predictions), "image": (labels, predictions)}`` of ``v`` on ``clips``."""
    if not clips:
        raise DatasetError("no clips to score")
    clip_pred = predict_clips(v, pad_clips([c.features for c in clips])).argmax(1)
    frames = [f[None] for c in clips for f in c.features]
    image_pred = predict_clips(v, pad_clips(frames)).argmax(1)
    return {
        "clip": (np.array([c.label for c in clips]), clip_pred),
        "image": (np.array([c.label for c in clips for _ in c.features]), image_pred),
    }


def _micro(y: np.ndarray, pred: np.ndarray) -> float:
    return float((y == pred).mean())


@dataclass(slots=True)
class _Pool:
    """Labels and predictions pooled over people, before and after, per level."""

    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, key: str, arr: np.ndarray) -> None:
        self.parts.setdefault(key, []).append(arr)

    def report(self, level: str, when: str, classes: tuple[str, ...]) -> dict[str, Any]:
        y = np.concatenate(self.parts[f"{level}/y"])
        pred = np.concatenate(self.parts[f"{level}/{when}"])
        return classification_report(y, pred, classes).as_dict()


def personalize_people(
    people: Sequence[PersonClips],
    central: Mapping[str, np.ndarray],
    *,
    num_classes: int,
    method: Method,
    dp: DPConfig | None = None,
) -> dict[str, Any]:
    """Personalize the central v (named arrays) for every person and score before/after on their test clips.

    Returns one JSON-friendly dict: ``table`` (pooled per-class reports before/after, clip and image level),
    ``per_person`` (micro F1 before/after/delta, selected clips, seconds, epsilon) and ``summary`` (per level:
    mean delta, improved/unchanged/worse counts), ``seconds_per_person`` (mean and max).
    """
    classes = CLASS_SETS[num_classes]
    v0 = VideoModel(num_classes=num_classes)
    from_named_arrays(v0, central)
    pool = _Pool()
    before: dict[str, dict[str, float]] = {"clip": {}, "image": {}}
    after: dict[str, dict[str, float]] = {"clip": {}, "image": {}}
    rows: list[dict[str, Any]] = []
    for person in people:
        if not person.adapt or not person.test:
            continue
        s0 = score(v0, person.test)
        t0 = time.perf_counter()
        model, res = adapt(person, central, num_classes=num_classes, method=method, dp=dp)
        seconds = time.perf_counter() - t0
        s1 = score(model, person.test)
        row: dict[str, Any] = {"person": person.person, "selected": res.selected, "seconds": seconds}
        for level in ("clip", "image"):
            (y, p0), (_, p1) = s0[level], s1[level]
            pool.add(f"{level}/y", y)
            pool.add(f"{level}/before", p0)
            pool.add(f"{level}/after", p1)
            before[level][person.person], after[level][person.person] = _micro(y, p0), _micro(y, p1)
            row[f"{level}_before"], row[f"{level}_after"] = (
                before[level][person.person],
                after[level][person.person],
            )
        if res.epsilon is not None:
            row["epsilon"] = res.epsilon
        rows.append(row)
    if not rows:
        raise DatasetError("no person has both adaptation and test clips")
    times = [float(r["seconds"]) for r in rows]
    return {
        "method": method.name,
        "description": method.description,
        "dp": None if dp is None else {"target_epsilon": dp.target_epsilon, "delta": dp.delta},
        "people": len(rows),
        "table": {
            level: {when: pool.report(level, when, classes) for when in ("before", "after")}
            for level in ("clip", "image")
        },
        "summary": {level: subject_deltas(before[level], after[level]) for level in ("clip", "image")},
        "per_person": rows,
        "epsilon_max": max((r.get("epsilon", 0.0) for r in rows), default=None) if dp is not None else None,
        "seconds_per_person": {"mean": float(np.mean(times)), "max": float(np.max(times))},
    }


def _secure_mean(
    updates: Mapping[int, np.ndarray], weights: Mapping[int, int], *, clip: float
) -> tuple[np.ndarray, int]:
    """The weighted mean of the clients' updates as the aggregator recovers it: one SecAgg round in process.

    Real crypto and real message encoding (every message goes through its canonical bytes); no dropouts.
    """
    n = len(updates)
    ids = sorted(updates)
    dim = len(updates[ids[0]])
    params = SecAggParams.create(
        round_id=os.urandom(32), num_clients=n, dim=dim, clip=clip, max_weight=max(max(weights.values()), 1)
    )
    keys = {i: IdentityKey.generate() for i in range(1, n + 1)}
    roster = {i: k.public_bytes() for i, k in keys.items()}
    server = SecAggServer(params=params, identity_keys=roster)
    clients = {
        i: SecAggClient(params=params, client_id=i, identity_key=keys[i], identity_keys=roster)
        for i in range(1, n + 1)
    }
    slot = dict(zip(range(1, n + 1), ids, strict=True))

    def wire(message: Any) -> Any:
        return decode_message(message.to_bytes())

    for c in clients.values():
        server.receive(wire(c.advertise_keys()))
    for cid, msg in server.close_stage().items():
        server.receive(wire(clients[cid].share_keys(wire(msg))))
    for cid, msg in server.close_stage().items():
        update = np.asarray(updates[slot[cid]], np.float32)
        server.receive(
            wire(clients[cid].masked_input(wire(msg), update=update, weight=int(weights[slot[cid]])))
        )
    for cid, msg in server.close_stage().items():
        server.receive(wire(clients[cid].consistency_check(wire(msg))))
    for cid, msg in server.close_stage().items():
        server.receive(wire(clients[cid].unmask(wire(msg))))
    server.close_stage()
    result = server.result()
    return np.asarray(result.mean(), np.float64), int(result.total_weight)


def secure_fedavg(
    federating: Sequence[PersonClips],
    unseen: Sequence[PersonClips],
    central: Mapping[str, np.ndarray],
    *,
    num_classes: int,
    method: Method,
    rounds: int = 2,
    round_dp: RoundDPConfig | None = None,
    clip: float = 1.0,
) -> dict[str, Any]:
    """``rounds`` of secure FedAvg of personalized v's over ``federating``; central v scored on ``unseen``.

    Each round every federating person personalizes the current central v on their adaptation clips and
    contributes Δv (weighted by selected clips; weight 1 and clipped + noised under ``round_dp``) through one
    in-process SecAgg round; the recovered mean is applied to the central v. After every round the central v
    is scored on the unseen people's test clips (pooled, clip and image level).

    Returns ``{"rounds": [{round, clip: report, image: report, contributors, total_weight}], "epsilon",
    "final"}``: ``epsilon`` is the user-level DP epsilon over all rounds (``None`` without ``round_dp``),
    ``final`` the last central v's named arrays.
    """
    if type(rounds) is not int or rounds < 1:
        raise DatasetError("rounds must be a positive int")
    people = [p for p in federating if p.adapt]
    tests = [c for p in unseen for c in p.test]
    if len(people) < 2 or not tests:
        raise DatasetError("need two federating people and unseen test clips")
    classes = CLASS_SETS[num_classes]
    current = {k: np.asarray(v, np.float32) for k, v in central.items()}
    order = sorted(current)

    def scored(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        v = VideoModel(num_classes=num_classes)
        from_named_arrays(v, arrays)
        got = score(v, tests)
        return {level: classification_report(y, p, classes).as_dict() for level, (y, p) in got.items()}

    history: list[dict[str, Any]] = [{"round": 0, **scored(current), "contributors": 0, "total_weight": 0}]
    for r in range(1, rounds + 1):
        updates: dict[int, np.ndarray] = {}
        weights: dict[int, int] = {}
        for i, person in enumerate(people):
            model, res = adapt(person, current, num_classes=num_classes, method=method)
            if res.selected == 0 and round_dp is None:
                continue
            flat, weight, _ = round_contribution(
                current, to_named_arrays(model), order=order, examples=max(res.selected, 1), dp=round_dp
            )
            updates[i], weights[i] = flat, weight
        if len(updates) < 2:
            history.append({"round": r, **scored(current), "contributors": len(updates), "total_weight": 0})
            continue
        mean, total = _secure_mean(updates, weights, clip=clip)
        delta: dict[str, np.ndarray] = {}
        pos = 0
        for k in order:
            size = current[k].size
            delta[k] = mean[pos : pos + size].reshape(current[k].shape)
            pos += size
        current = apply_update(current, delta)
        history.append({"round": r, **scored(current), "contributors": len(updates), "total_weight": total})
    epsilon = None
    if round_dp is not None:  # every round is one Gaussian release of the clipped sum (RDP composition)
        epsilon = gaussian_epsilon(round_dp.noise_multiplier, rounds, round_dp.delta)
    return {"rounds": history, "epsilon": epsilon, "final": current}
