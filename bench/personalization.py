"""``fedfer-bench personalization``: the learning measured on real people (the Taiwanese corpus).

Everything runs through the device's own code on the real photos of ``data/taiwanese-emotions``:

1. **IFER vs the peer across corpora.** Every photo of the chosen performers goes through the device's
   path (MediaPipe detector, the IFER export's framing, the pipeline's 224x224 crop) and both the shipped
   IFER and the published mini-Xception peer score the *same crops* (the peer plain, as published, and with
   the IFER's test-time views). Both are also scored on FER2013's test split (6 and 7 classes).
2. **The central v** for each class set, trained on FER2013-derived clips
   (:mod:`fedfer.agent.training.central`; never on a performer), scored on FER2013 test.
3. **Personalization per performer** (each performer one device; :mod:`fedfer.agent.training.people`):
   adapt on the unlabelled types 0-2 and test on type 3 (``forward``), and the reverse; every method, plain
   and with DP-SGD; Table 2 (pooled per-class P/R/F1 before/after) and Fig. 3 (per-performer micro F1
   delta, PNG).
4. **Secure FedAvg**: two rounds over the federating performers through the project's SecAgg state
   machines, the central v scored on the unseen performers' type-3 tests, without and with user-level DP.

``--performers test`` (default) reports performers 11-30; ``--performers dev`` (01-10) is what every method
and setting was chosen on. Prints one JSON object; timings are wall seconds on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfer.agent.learning.dp import DPConfig
from fedfer.agent.learning.update import RoundDPConfig
from fedfer.agent.models.ifer import FaceNet, load_ifer
from fedfer.agent.models.shipped import shipped_ifer
from fedfer.agent.models.video import VideoModel, from_named_arrays, to_named_arrays
from fedfer.agent.records import CLASS_SETS
from fedfer.agent.training import taiwanese as tw
from fedfer.agent.training.central import image_features, train_or_load_central_v
from fedfer.agent.training.data import LabelledImage, dev_split, hash_order, list_image_folder
from fedfer.agent.training.ifer import load_images, restrict_probs
from fedfer.agent.training.metrics import ClassReport, classification_report, plot_subject_deltas
from fedfer.agent.training.peer import MiniXception, load_peer, peer_predict
from fedfer.agent.training.people import METHODS, Clip, PersonClips, personalize_people, score, secure_fedavg
from fedfer.aggregator.shipped import shipped_central_v

_DETECTOR = "models/mediapipe/face_detection_short_range.tflite"
_PEER = "models/fer_minixception/emotion_model.hdf5"
SEVEN = CLASS_SETS[7]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the benchmark's options."""
    default_assets = os.environ.get("FEDFER_ASSETS", str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--assets", type=Path, default=Path(default_assets), help="the shared asset folder")
    parser.add_argument("--ifer", type=Path, default=None, help="IFER export (default: the shipped one)")
    parser.add_argument(
        "--train-central",
        action="store_true",
        help="train the central v's on FER2013 (cached) instead of loading the shipped ones (which need the "
        "shipped IFER)",
    )
    parser.add_argument("--performers", choices=("test", "dev"), default="test")
    parser.add_argument("--classes", type=int, nargs="+", default=[4, 6, 7])
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    parser.add_argument("--splits", nargs="+", default=["forward", "reverse"], choices=["forward", "reverse"])
    parser.add_argument(
        "--dp-epsilon", type=float, default=8.0, help="DP-SGD target epsilon (0 = no DP runs)"
    )
    parser.add_argument("--dp-delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=2, help="secure FedAvg rounds (0 = none)")
    parser.add_argument(
        "--round-dp-epsilon", type=float, default=8.0, help="user-level DP epsilon over all rounds (0 = none)"
    )
    parser.add_argument("--round-clip-norm", type=float, default=0.05, help="L2 bound on one device's update")
    parser.add_argument(
        "--limit", type=int, default=0, help="smoke runs: N - 1 federating performers and one unseen (N >= 3)"
    )
    parser.add_argument("--fer-test-limit", type=int, default=0, help="FER2013 test images (0 = all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--plot-dir", type=Path, default=None, help="write the Fig. 3 PNGs here")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _scores(report: ClassReport) -> dict[str, float]:
    return {"macro_f1": report.macro_f1, "micro_f1": report.micro_f1}


def _restricted(y7: np.ndarray, probs: np.ndarray, k: int) -> dict[str, float]:
    """Macro/micro F1 of 7-class probabilities on the images whose label is in the ``k``-class set."""
    classes = CLASS_SETS[k]
    keep = np.array([SEVEN[y] in classes for y in y7])
    y = np.array([classes.index(SEVEN[v]) for v in y7[keep]])
    return _scores(classification_report(y, restrict_probs(probs[keep], SEVEN, classes).argmax(1), classes))


def _cross_corpus(
    feats: Sequence[tw.PhotoFeatures], crops: np.ndarray, net: FaceNet, peer: MiniXception
) -> dict[str, Any]:
    """IFER vs the peer on the same crops of the performers' photos, 7 and 6 classes."""
    y7 = np.array([SEVEN.index(f.photo.expression) for f in feats])
    ifer = np.stack([f.probs for f in feats])
    peer_plain = peer_predict(peer, crops, SEVEN)
    peer_views = peer_predict(peer, crops, SEVEN, views=net.views)
    out: dict[str, Any] = {}
    for k in (7, 6):
        ours, theirs = _restricted(y7, ifer, k), _restricted(y7, peer_plain, k)
        out[str(k)] = {
            "ifer": ours,
            "peer": theirs,
            "peer_with_ifer_views": _restricted(y7, peer_views, k),
            "ifer_minus_peer_macro_f1": ours["macro_f1"] - theirs["macro_f1"],
        }
    return out


def _fer_test(items: Sequence[LabelledImage], net: FaceNet, peer: MiniXception) -> dict[str, Any]:
    """IFER vs the peer on FER2013 test, 7 and 6 classes."""
    _, ifer = image_features(items, net)
    peer_p = peer_predict(peer, load_images(items), SEVEN)
    y7 = np.array([it.label for it in items])
    out: dict[str, Any] = {"images": len(items)}
    for k in (7, 6):
        out[str(k)] = {"ifer": _restricted(y7, ifer, k), "peer": _restricted(y7, peer_p, k)}
    return out


def _fedavg(
    args: argparse.Namespace,
    people: Sequence[PersonClips],
    central: dict[str, np.ndarray],
    k: int,
    method: str,
) -> dict[str, Any]:
    """Secure FedAvg over the federating performers, scored on the unseen ones (plain and user-level DP)."""
    fed_ids = {f"{p:02d}" for p in tw.FEDERATING[args.performers]}
    unseen_ids = {f"{p:02d}" for p in tw.UNSEEN[args.performers]}
    federating = [p for p in people if p.person in fed_ids]
    unseen = [p for p in people if p.person in unseen_ids]
    out: dict[str, Any] = {"method": method, "federating": sorted(fed_ids), "unseen": sorted(unseen_ids)}
    modes: list[tuple[str, RoundDPConfig | None]] = [("plain", None)]
    if args.round_dp_epsilon > 0:
        sigma = _round_sigma(args.round_dp_epsilon, args.rounds, args.dp_delta)
        user_dp = RoundDPConfig(
            clip_norm=args.round_clip_norm,
            noise_multiplier=sigma,
            num_clients=len(federating),
            delta=args.dp_delta,
        )
        modes.append(("user_dp", user_dp))
    for mode, dp in modes:
        t0 = time.perf_counter()
        # The aggregator's coordinate clip stays 5x above a noise share's std (docs/learning.md).
        clip = (
            1.0 if dp is None else max(1.0, 5.0 * dp.noise_multiplier * dp.clip_norm / len(federating) ** 0.5)
        )
        got = secure_fedavg(
            federating,
            unseen,
            central,
            num_classes=k,
            method=METHODS[method],
            rounds=args.rounds,
            round_dp=dp,
            clip=clip,
        )
        rounds = got["rounds"]
        first, last = rounds[0], rounds[-1]
        out[mode] = {
            "rounds": [
                {
                    "round": r["round"],
                    "contributors": r["contributors"],
                    **{lvl: _scores_dict(r[lvl]) for lvl in ("clip", "image")},
                }
                for r in rounds
            ],
            "delta_micro_f1": {
                lvl: last[lvl]["micro_f1"] - first[lvl]["micro_f1"] for lvl in ("clip", "image")
            },
            "delta_macro_f1": {
                lvl: last[lvl]["macro_f1"] - first[lvl]["macro_f1"] for lvl in ("clip", "image")
            },
            "table": {lvl: {"before": first[lvl], "after": last[lvl]} for lvl in ("clip", "image")},
            "epsilon": got["epsilon"],
            "noise_multiplier": None if dp is None else dp.noise_multiplier,
            "clip_norm": None if dp is None else dp.clip_norm,
            "seconds": time.perf_counter() - t0,
        }
        gain = 100 * out[mode]["delta_micro_f1"]["image"]
        _say(f"{k} classes fedavg {mode}: unseen image micro F1 {gain:+.1f}")
    return out


def _scores_dict(report: dict[str, Any]) -> dict[str, float]:
    return {"macro_f1": report["macro_f1"], "micro_f1": report["micro_f1"]}


def _round_sigma(epsilon: float, rounds: int, delta: float) -> float:
    """The noise multiplier whose ``rounds`` Gaussian releases cost ``epsilon`` at ``delta`` (bisection)."""
    from fedfer.security.dp import gaussian_epsilon

    lo, hi = 1e-3, 64.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if gaussian_epsilon(mid, rounds, delta) > epsilon else (lo, mid)
    return hi


def _personalization(
    args: argparse.Namespace, by_split: dict[str, list[PersonClips]], central: dict[str, np.ndarray], k: int
) -> dict[str, Any]:
    """Every method on every split, plain and with DP-SGD; Fig. 3 plots for the forward split."""
    dp = DPConfig(target_epsilon=args.dp_epsilon, delta=args.dp_delta) if args.dp_epsilon > 0 else None
    out: dict[str, Any] = {}
    for split_name, people in by_split.items():
        out[split_name] = {}
        for m in args.methods:
            runs = {"plain": personalize_people(people, central, num_classes=k, method=METHODS[m])}
            if dp is not None:
                runs["dp_sgd"] = personalize_people(people, central, num_classes=k, method=METHODS[m], dp=dp)
            for mode, r in runs.items():
                s = r["summary"]
                _say(
                    f"{k} classes {split_name} {m} {mode}: image micro F1 "
                    f"{100 * s['image']['mean_delta']:+.1f} "
                    f"({s['image']['improved']} better / {s['image']['worse']} worse), clip "
                    f"{100 * s['clip']['mean_delta']:+.1f}"
                )
                if args.plot_dir is not None and split_name == "forward":
                    args.plot_dir.mkdir(parents=True, exist_ok=True)
                    r["plots"] = {}
                    for level in ("image", "clip"):
                        path = args.plot_dir / f"fig3-{k}class-{m}-{mode}-{level}.png"
                        title = (
                            f"{k} classes, {m}, {mode}: per-performer {level}-level micro F1 (type-3 test)"
                        )
                        plot_subject_deltas(s[level], path, title=title)
                        r["plots"][level] = str(path)
            out[split_name][m] = runs
    return out


def _central_v(
    args: argparse.Namespace,
    net: FaceNet,
    train_items: Sequence[LabelledImage],
    dev_items: Sequence[LabelledImage],
    k: int,
) -> tuple[VideoModel, dict[str, Any]]:
    """The shipped central v for ``k`` classes (what devices start from), or one trained now."""
    if args.train_central or args.ifer is not None:
        v, run_ = train_or_load_central_v(net, train_items=train_items, dev_items=dev_items, num_classes=k)
        return v, {
            "source": "trained",
            "manifest": str(run_.manifest),
            "fer2013_dev_macro_f1": run_.dev_macro_f1,
        }
    arrays, meta = shipped_central_v(k)
    v = VideoModel(num_classes=k)
    from_named_arrays(v, arrays)
    return v.eval(), {
        "source": "shipped",
        "sha256": meta["sha256"],
        "fer2013_dev_macro_f1": meta["dev_macro_f1"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return the JSON-able result."""
    torch.set_num_threads(max(1, args.threads))
    t_start = time.perf_counter()
    assets: Path = args.assets
    detector = assets / _DETECTOR
    ifer_path = args.ifer or shipped_ifer()
    net = load_ifer(ifer_path)
    peer = load_peer(assets / _PEER)
    group = tuple(tw.DEV_PERFORMERS if args.performers == "dev" else tw.TEST_PERFORMERS)
    if args.limit:  # a smoke run: N - 1 federating performers and one unseen
        n = max(3, args.limit)
        group = tuple(sorted(tw.FEDERATING[args.performers][: n - 1] + tw.UNSEEN[args.performers][:1]))
    out: dict[str, Any] = {
        "performers": args.performers,
        "performer_ids": list(group),
        "protocol": "dev performers 01-10 choose, test 11-30 report; forward: adapt types 0-2, test type 3",
        "ifer": {
            "export": str(ifer_path),
            "framing": None if net.framing is None else net.framing.as_dict(),
            "views": len(net.views),
        },
    }
    photos = [p for p in tw.scan(assets / "data" / "taiwanese-emotions") if p.performer in group]
    t0 = time.perf_counter()
    feats = tw.photo_features(photos, net, detector=detector)
    crops = tw.photo_crops(photos, net, detector=detector)
    if [p for p, _ in crops] != [f.photo for f in feats]:
        raise RuntimeError("the IFER and the peer must score the same faces")
    out["photos"] = {"labelled": len(photos), "faces": len(feats), "seconds": time.perf_counter() - t0}
    out["cross_corpus"] = _cross_corpus(feats, np.stack([c for _, c in crops]), net, peer)
    fer = assets / "data" / "fer2013"
    test_items = list_image_folder(fer / "test", 7)
    if args.fer_test_limit:
        test_items = hash_order(test_items)[: args.fer_test_limit]
    _say(f"FER2013 test: {len(test_items)} faces through the IFER and the peer")
    out["fer2013_test"] = _fer_test(test_items, net, peer)
    dev_items, train_items = dev_split(list_image_folder(fer / "train", 7))
    fer_f, _ = image_features(test_items, net)
    fer_y = np.array([it.label for it in test_items])
    out["classes"] = {}
    for k in args.classes:
        classes = CLASS_SETS[k]
        _say(f"{k} classes: central v")
        v, about = _central_v(args, net, train_items, dev_items, k)
        central = to_named_arrays(v)
        keep = np.array([SEVEN[y] in classes for y in fer_y])
        test_clips = [
            Clip(f[None], np.zeros((1, k), np.float32), classes.index(SEVEN[y]))
            for f, y in zip(fer_f[keep], fer_y[keep], strict=True)
        ]
        y, pred = score(v, test_clips)["image"]
        res: dict[str, Any] = {
            "central_v": {**about, "fer2013_test": _scores(classification_report(y, pred, classes))}
        }
        by_split = {
            name: tw.person_clips(
                feats, net.classes, num_classes=k, split=tw.FORWARD if name == "forward" else tw.REVERSE
            )
            for name in args.splits
        }
        res["personalization"] = _personalization(args, by_split, central, k)
        if args.rounds and "forward" in by_split:
            res["fedavg"] = {m: _fedavg(args, by_split["forward"], central, k, m) for m in args.methods}
        out["classes"][str(k)] = res
    out["seconds"] = time.perf_counter() - t_start
    out["ok"] = True
    return out
