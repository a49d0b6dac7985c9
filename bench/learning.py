"""``fedfer-bench learning``: IFER vs the published peer on FER2013 test, and (simulated) personalization.

1. IFER (:mod:`fedfer.agent.training.recipe`): MobileNetV2 (real ImageNet weights) at ``--input-size``, blocks
   ``>= --split`` fine-tuned centrally on augmented FER2013 train faces (BatchNorm re-parametrized, label
   smoothing, cosine schedule, class-weighted CE) plus g, with 7 classes. The best epoch is chosen on a dev
   split of FER2013 train (the first 10% in a hash order); the test split is used for nothing but the final
   scores. The 6-class figures drop surprise from both the images and the probabilities, the same treatment
   the peer gets. The trained model is cached by content hash (recipe, code version, initial weights, data),
   so only the first run trains (``ifer_train_s`` is the measured training time either way).
2. Device cost: the exported IFER model as the agent runs it (``ExportedIferModel``: one backbone gives v's
   1,280-d features and the IFER probabilities) per 224x224 RGB face crop, against the paper's frozen f at
   224 (``IferModel``), both timed here; and the whole edge pipeline (decode, MediaPipe, f, g, encrypted
   cache) on a real CREMA-D clip with each model (``fedfer.bench.edge``).
3. v: trained centrally on short clips rendered from FER2013 *dev* faces (faces f was not trained on; small
   temporal jitter), features from the same fine-tuned f at the same input size as the device.
4. Personalization, a SIMULATION: subjects with consistent appearance shifts over FER2013 test faces, an
   unlabelled adaptation half and a disjoint test half; per-subject micro F1 before/after, with/without DP,
   with the paper's defaults. Diagnostics per subject: IFER pseudo-label accuracy (all adaptation clips and
   the selected ones), how many clips were selected, and v adapted on the same clips with their TRUE labels
   (an oracle: what adaptation could do with perfect pseudo labels).
5. Tuning (``--tune-subjects``): a separate set of simulated subjects (other faces, other styles and
   seeds) compares learning rates, epochs, thresholds and the oracles; the best non-oracle setting there is
   then also reported on the main subjects (``personalization_tuned_*``), next to the paper's defaults.
6. Speed of personalization at the issue's worst case: per subject, the whole device-side step on exactly
   ``--timing-clips`` (P x K = 300) selected clips of ``--frames`` frames (25 = a 2.5 s clip at 10 fps).
   Wall-clock and CPU seconds are both reported: the wall clock depends on how busy the machine is.
7. ``crema_sample``: the six real CREMA-D clips through the full clip path with the trained IFER.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.agent.files import DETECTOR_MODEL, MOBILENET_TFLITE, assets_dir

_SAMPLE = Path("data/crema-d-sample")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    default_assets = str(assets_dir())
    parser.add_argument("--assets", type=Path, default=Path(default_assets))
    parser.add_argument("--input-size", type=int, default=64, help="IFER input side (the device's too)")
    parser.add_argument(
        "--split", type=int, default=1, help="first fine-tuned MobileNetV2 block (19 = frozen f)"
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--backbone-lr", type=float, default=5e-4, help="peak learning rate of f's blocks")
    parser.add_argument(
        "--train-limit", type=int, default=0, help="use only this many train images (0 = all)"
    )
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument(
        "--tune-subjects", type=int, default=8, help="separate simulated subjects for tuning (0 = none)"
    )
    parser.add_argument("--adapt-clips", type=int, default=300, help="unlabelled clips per subject")
    parser.add_argument("--test-clips", type=int, default=90, help="test clips per subject")
    parser.add_argument(
        "--frames", type=int, default=25, help="frames per simulated clip (25 = 2.5 s at 10 fps)"
    )
    parser.add_argument(
        "--timing-clips", type=int, default=300, help="selected clips per timed personalization (P x K)"
    )
    parser.add_argument("--v-clips-per-class", type=int, default=200)
    parser.add_argument("--v-epochs", type=int, default=20)
    parser.add_argument("--dp-epsilon", type=float, default=8.0)
    parser.add_argument(
        "--test-limit", type=int, default=0, help="score only this many test images (0 = all)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)"
    )
    parser.add_argument(
        "--edge-seconds",
        type=float,
        default=10.0,
        help="seconds of real video through the whole edge pipeline per model (0 = skip)",
    )
    parser.add_argument("--plot", type=Path, default=None, help="save the per-subject PNG here")
    parser.add_argument(
        "--ifer6",
        action="store_true",
        help="also train IFER on the 6-class set itself (ifer6_*; the default scores the 7-class model on 6)",
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _epoch(prefix: str) -> Callable[[dict[str, float]], None]:
    def show(rec: dict[str, float]) -> None:
        _say(
            f"{prefix} epoch {int(rec['epoch'])}: loss {rec['loss']:.4f}, dev macro F1 "
            f"{100 * rec['dev_macro_f1']:.1f}, {rec['seconds']:.0f} s"
        )

    return show


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment and return the JSON-able result."""
    import torch

    from fedfer.agent.records import CLASS_SETS
    from fedfer.agent.training.data import dev_split, hash_order, list_image_folder
    from fedfer.agent.training.ifer import load_images
    from fedfer.agent.training.metrics import classification_report
    from fedfer.agent.training.recipe import IferRecipe, calibrate_or_load, train_or_load_ifer

    torch.set_num_threads(max(1, args.threads))
    t_start = time.perf_counter()
    assets: Path = args.assets
    seven, six = CLASS_SETS[7], CLASS_SETS[6]
    out: dict[str, Any] = {
        "simulation": "personalization figures come from SIMULATED subjects (FER2013 faces)"
    }

    # ---- IFER: dev split of train for model selection; the test split only for the final scores --------
    fer = assets / "data" / "fer2013"
    test_items = list_image_folder(fer / "test", 7)
    if args.test_limit:
        test_items = hash_order(test_items)[: args.test_limit]
    train_items = hash_order(list_image_folder(fer / "train", 7))
    if args.train_limit:
        train_items = train_items[: args.train_limit]
    dev_items, fit_items = dev_split(train_items)
    base = IferRecipe()
    recipe = dataclasses.replace(
        base,
        input_size=args.input_size,
        split=args.split,
        train=dataclasses.replace(
            base.train,
            epochs=args.epochs,
            backbone_lr=args.backbone_lr,
            warmup_epochs=min(base.train.warmup_epochs, args.epochs / 4),
        ),
    )
    weights = assets / MOBILENET_TFLITE
    net, info = train_or_load_ifer(
        recipe, weights=weights, train_items=fit_items, dev_items=dev_items, progress=_epoch("ifer")
    )
    out.update(
        ifer_train_cached=info.cached,
        ifer_train_s=info.train_seconds,
        ifer_load_s=info.seconds if info.cached else 0.0,
        ifer_train_images=info.train_images,
        ifer_dev_images=len(dev_items),
        ifer_best_epoch=info.best_epoch,
        ifer_history=info.history,
        ifer_cache_key=info.key,
        ifer_recipe=repr(recipe),
    )
    # g's class biases fitted on the same dev split (fedfer.agent.training.calibrate); the test split is not
    # used.
    net, cal = calibrate_or_load(net, info, dev_items=dev_items)
    out.update(
        ifer_class_bias=dict(zip(seven, cal.class_bias, strict=True)),
        ifer_dev_macro_f1_uncalibrated=cal.dev_macro_f1_before,
        ifer_dev_macro_f1=cal.dev_macro_f1,
    )
    t0 = time.perf_counter()
    test_faces = load_images(test_items)
    _, probs7 = net.infer(test_faces)
    out["ifer_test_infer_s"] = time.perf_counter() - t0
    test_labels = np.array([it.label for it in test_items])
    rep7 = classification_report(test_labels, probs7.argmax(1), seven)
    is6 = np.array([seven[y] in six for y in test_labels])
    y6 = np.array([six.index(seven[y]) for y in test_labels[is6]])
    from fedfer.agent.training.ifer import restrict_probs

    rep6 = classification_report(y6, restrict_probs(probs7[is6], seven, six).argmax(1), six)
    # The model as trained, for comparison: calibration only rescaled its probabilities by exp(bias).
    raw7 = probs7 * np.exp(-np.asarray(cal.class_bias, dtype=np.float32))
    raw7 /= raw7.sum(1, keepdims=True)
    raw6 = classification_report(y6, restrict_probs(raw7[is6], seven, six).argmax(1), six)
    out.update(
        ifer_uncalibrated_macro_f1=raw6.macro_f1,
        ifer_uncalibrated_micro_f1=raw6.micro_f1,
        ifer7_uncalibrated_macro_f1=classification_report(test_labels, raw7.argmax(1), seven).macro_f1,
    )
    if args.ifer6:
        # The same recipe trained on the 6-class set itself (surprise images left out), same test images.
        def as6(items: list[Any]) -> list[Any]:
            return [
                dataclasses.replace(it, label=six.index(seven[it.label]))
                for it in items
                if seven[it.label] in six
            ]

        net6, info6 = train_or_load_ifer(
            dataclasses.replace(recipe, num_classes=6),
            weights=weights,
            train_items=as6(fit_items),
            dev_items=as6(dev_items),
            progress=_epoch("ifer6"),
        )
        _, probs6 = net6.infer(test_faces[is6])
        rep6_own = classification_report(y6, probs6.argmax(1), six)
        out.update(
            ifer6_macro_f1=rep6_own.macro_f1,
            ifer6_micro_f1=rep6_own.micro_f1,
            ifer6_train_cached=info6.cached,
            ifer6_train_s=info6.train_seconds,
            ifer6_train_images=info6.train_images,
        )

    # ---- the peer on the same images ------------------------------------------------------------------
    peer, pp = _peer_probs(assets, test_faces, seven)
    peer7 = classification_report(test_labels, pp.argmax(1), seven)
    peer6 = classification_report(y6, restrict_probs(pp[is6], seven, six).argmax(1), six)
    out.update(
        ifer_macro_f1=rep6.macro_f1,
        ifer_micro_f1=rep6.micro_f1,
        peer_macro_f1=peer6.macro_f1,
        peer_micro_f1=peer6.micro_f1,
        ifer7_macro_f1=rep7.macro_f1,
        ifer7_micro_f1=rep7.micro_f1,
        peer7_macro_f1=peer7.macro_f1,
        peer7_micro_f1=peer7.micro_f1,
        ifer_per_class_f1=dict(zip(six, rep6.f1, strict=True)),
        peer_per_class_f1=dict(zip(six, peer6.f1, strict=True)),
        test_images_6=int(is6.sum()),
        test_images_7=len(test_items),
        ifer_input_size=args.input_size,
        ifer_finetuned_from_block=args.split,
    )

    # ---- device cost -----------------------------------------------------------------------------------
    out.update(_device_speed(args, net, peer, test_faces[0], cal.manifest))

    # ---- central v (6 classes) on jittered clips of dev faces ------------------------------------------
    from fedfer.agent.models.video import to_named_arrays
    from fedfer.agent.training.vfer import VferTrainConfig, train_vfer

    clips = _ClipFeatures(net, args.frames)
    t0 = time.perf_counter()
    dev6 = [it for it in dev_items if seven[it.label] in six]
    v_dev = dev6[: min(60 * 6, len(dev6) // 4)]
    per_class: dict[int, list[Any]] = {}
    for it in dev6[len(v_dev) :]:
        per_class.setdefault(it.label, []).append(it)
    v_items = [it for lst in per_class.values() for it in lst[: args.v_clips_per_class]]
    vf, _ = clips(v_items, None, 1)
    df, _ = clips(v_dev, None, 2)
    v_labels = np.array([six.index(seven[it.label]) for it in v_items])
    d_labels = np.array([six.index(seven[it.label]) for it in v_dev])
    v_model, v_res = train_vfer(
        vf, v_labels, df, d_labels, num_classes=6, config=VferTrainConfig(epochs=args.v_epochs)
    )
    out["v_train_s"] = time.perf_counter() - t0
    out["v_train_clips"] = len(v_items)
    out["v_dev_macro_f1"] = v_res.best_dev_macro_f1
    v_arrays = to_named_arrays(v_model)

    # ---- simulated subjects: reported ones, then separate tuning subjects ------------------------------
    test6 = hash_order([it for it in test_items if seven[it.label] in six])
    per_subject = args.adapt_clips + args.test_clips
    if per_subject * (args.subjects + args.tune_subjects) > len(test6):
        raise SystemExit("not enough FER2013 test faces for that many simulated subjects")
    if not 1 <= args.timing_clips <= args.adapt_clips:
        raise SystemExit("--timing-clips must lie in [1, --adapt-clips]")
    from fedfer.agent.training.simulate import make_styles

    def subjects(first: int, count: int, style_seed: int, render_seed: int) -> list[_Subject]:
        made = []
        for i, style in enumerate(make_styles(count, seed=style_seed) if count else []):
            lo = (first + i) * per_subject
            items = test6[lo : lo + per_subject]
            feats, probs = clips(items, style, render_seed + i)
            truth = np.array([six.index(seven[it.label]) for it in items])
            made.append(_Subject(style.name, feats, probs, truth, args.adapt_clips))
        return made

    reported = subjects(0, args.subjects, 7, 100)
    out.update(_timing(args, v_arrays, reported))
    out.update(_personalization(args, v_model, v_arrays, reported))
    if args.tune_subjects:
        # Other faces (after the reported subjects' faces), other styles, other render seeds.
        tuning = subjects(args.subjects, args.tune_subjects, 1007, 500)
        out.update(_tuning(args, v_model, v_arrays, tuning, reported))
    out["crema_sample"] = _crema_sample(args, net, v_model)
    out["total_s"] = time.perf_counter() - t_start
    return out


def _peer_probs(assets: Path, faces: np.ndarray, classes: tuple[str, ...]) -> tuple[Any, np.ndarray]:
    """The published mini-Xception's probabilities on ``faces`` (64x64 grayscale), in ``classes`` order."""
    import cv2
    import torch

    from fedfer.agent.training.peer import PEER_CLASSES, load_peer, peer_preprocess

    peer = load_peer(assets / "models" / "fer_minixception" / "emotion_model.hdf5")
    names = {"anger": "angry", "happiness": "happy", "sadness": "sad"}
    probs = []
    with torch.inference_mode():
        for s in range(0, len(faces), 512):
            g = np.stack([cv2.resize(f, (64, 64)) for f in faces[s : s + 512]])
            probs.append(torch.softmax(peer(peer_preprocess(g)), 1).numpy())
    cols = [PEER_CLASSES.index(names.get(c, c)) for c in classes]
    return peer, np.concatenate(probs)[:, cols]


def _per_frame(fn: Callable[[], Any], n: int = 60) -> tuple[float, float]:
    """Frames per wall-clock second and per CPU second of ``fn`` (one frame per call), after a warm-up."""
    for _ in range(5):
        fn()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def _device_speed(
    args: argparse.Namespace, net: Any, peer: Any, face: np.ndarray, manifest: Path
) -> dict[str, Any]:
    """Per-frame cost of the exported IFER (what the agent runs) vs the paper's f at 224; edge pipeline."""
    import cv2
    import torch

    from fedfer.agent.training.peer import peer_preprocess
    from fedfer.agent.vision.pipeline import ExportedIferModel, load_frame_model

    # The pipeline hands the frame model 224x224 RGB crops (fedfer.agent.vision.faces); one crop per call, as
    # a camera.
    crop = np.ascontiguousarray(np.repeat(cv2.resize(face, (224, 224))[None, :, :, None], 3, axis=3))
    device = ExportedIferModel(net)
    paper = load_frame_model(feature_weights=args.assets / MOBILENET_TFLITE, num_classes=6)  # f at 224 + g
    res: dict[str, Any] = {}
    models: dict[str, Any] = {"ifer_device": device, "f224": paper}
    for name, model in models.items():

        def frame(model: Any = model) -> Any:
            return model.classify(model.features(crop))

        res[f"{name}_fps"], res[f"{name}_fps_cpu"] = _per_frame(frame)
    # Per-frame CPU cost of our IFER (features for v and probabilities) relative to the paper's f at 224.
    res["ifer_device_cost_vs_f224"] = res["f224_fps_cpu"] / res["ifer_device_fps_cpu"]
    face64 = peer_preprocess(np.stack([cv2.resize(face, (64, 64))]))
    with torch.inference_mode():
        res["peer_fps"], res["peer_fps_cpu"] = _per_frame(lambda: peer(face64))
    if args.edge_seconds > 0:
        from fedfer.bench import edge

        video = sorted((args.assets / _SAMPLE).glob("*.flv"))[0]
        for name, ifer in (("edge", manifest), ("edge_f224", None)):
            # The edge benchmark's own parser, so its defaults (and any option added later) apply.
            parser = argparse.ArgumentParser()
            edge.add_arguments(parser)
            argv = ["--video", str(video), "--seconds", str(args.edge_seconds)]
            argv += ["--assets", str(args.assets), "--batch-size", "4", "--threads", str(args.threads)]
            argv += ["--no-baseline", "--repeats", "1"] + (["--ifer", str(ifer)] if ifer else [])
            ns = parser.parse_args(argv)
            got = edge.run(ns)
            res[f"{name}_frames_per_s"] = got.get("frames_per_s", 0.0)
            res[f"{name}_stage_ms"] = got.get("stage_ms", {})
        torch.set_num_threads(max(1, args.threads))
    return res


class _ClipFeatures:
    """Simulated clips → per-frame f features and IFER probabilities (6 classes), cached by content hash."""

    def __init__(self, net: Any, frames: int) -> None:
        self.net = net
        self.frames = frames
        self.model_id = net.weights_digest()

    def __call__(self, items: list[Any], style: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
        from fedfer.agent.models.export import content_key
        from fedfer.agent.records import CLASS_SETS
        from fedfer.agent.training.cached import cached_arrays, files_digest
        from fedfer.agent.training.data import read_gray
        from fedfer.agent.training.ifer import restrict_probs
        from fedfer.agent.training.simulate import render_clips

        key = content_key(
            "bench-clips/2",
            self.model_id,
            str(self.net.input_size),
            files_digest(it.path for it in items),
            repr(style),
            str(self.frames),
            str(seed),
        )

        def compute() -> dict[str, np.ndarray]:
            grays = [read_gray(it.path) for it in items]
            rendered = render_clips(grays, style, frames=self.frames, seed=seed)
            f, p = self.net.infer(rendered.reshape(-1, *rendered.shape[2:]))
            shape = (len(items), self.frames, -1)
            return {"f": f.astype(np.float16).reshape(shape), "p": p.reshape(shape)}

        got = cached_arrays(key, compute, sub="clips")
        probs = restrict_probs(got["p"], CLASS_SETS[7], CLASS_SETS[6])
        return got["f"].astype(np.float32), probs


@dataclasses.dataclass
class _Subject:
    """One simulated subject: clip features, IFER probabilities and true labels; adaptation half first."""

    name: str
    feats: np.ndarray
    probs: np.ndarray
    truth: np.ndarray
    n_adapt: int

    @property
    def adapt(self) -> slice:
        return slice(0, self.n_adapt)

    @property
    def test(self) -> slice:
        return slice(self.n_adapt, len(self.truth))


def _timing(
    args: argparse.Namespace, v_arrays: dict[str, np.ndarray], subjects: list[_Subject]
) -> dict[str, Any]:
    """The device-side step at the worst case: exactly ``--timing-clips`` selected clips, plain and DP."""
    from fedfer.agent.learning.dp import DPConfig
    from fedfer.agent.learning.ledger import PrivacyBudget
    from fedfer.agent.learning.personalize import PersonalizeConfig, personalize

    # The timed runs keep every one of their clips (P = all, no threshold): exactly --timing-clips selected.
    timing = PersonalizeConfig(per_class=args.timing_clips, p_threshold=0.0)
    timed: dict[str, list[float]] = {"plain_s": [], "plain_cpu_s": [], "dp_s": [], "dp_cpu_s": []}
    eps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, s in enumerate(subjects):  # the first subject's figures include the cold start
            for mode in ("plain", "dp"):
                dp: dict[str, Any] = {}
                if mode == "dp":
                    path = Path(tmp) / f"timed-{i}.json"
                    budget = PrivacyBudget(path=path, epsilon_limit=args.dp_epsilon * 1.5)
                    dp = {"dp": DPConfig(target_epsilon=args.dp_epsilon), "budget": budget}
                c0 = time.process_time()
                _, r = personalize(
                    v_arrays,
                    list(s.feats[: args.timing_clips]),
                    list(s.probs[: args.timing_clips]),
                    num_classes=6,
                    config=timing,
                    **dp,
                )
                if r.selected != args.timing_clips:
                    raise SystemExit(f"timed personalization selected {r.selected}, not {args.timing_clips}")
                timed[f"{mode}_s"].append(r.seconds)
                timed[f"{mode}_cpu_s"].append(time.process_time() - c0)
                if r.epsilon is not None:
                    eps.append(r.epsilon)
    return {
        "personalize_s": float(np.mean(timed["plain_s"])),
        "personalize_dp_s": float(np.mean(timed["dp_s"])),
        "personalize_cpu_s": float(np.mean(timed["plain_cpu_s"])),
        "personalize_dp_cpu_s": float(np.mean(timed["dp_cpu_s"])),
        "personalize_max_s": float(np.max(timed["plain_s"])),
        "personalize_dp_max_s": float(np.max(timed["dp_s"])),
        "personalize_clips": args.timing_clips,
        "personalize_frames": args.frames,
        "personalize_threads": args.threads,
        "timed_dp_epsilon": float(np.mean(eps)),
    }


def _adapt(
    v_arrays: dict[str, np.ndarray],
    s: _Subject,
    config: Any,
    *,
    oracle: bool = False,
    dp: Any = None,
    budget: Any = None,
) -> tuple[float, Any]:
    """Personalize on the subject's adaptation half; micro F1 (accuracy) of the result on its test half.

    ``oracle`` fine-tunes on the clips the paper's selection keeps but with their TRUE labels.
    """
    from fedfer.agent.learning.personalize import (
        finetune_v,
        pad_clips,
        personalize,
        predict_clips,
        pseudo_labels,
        select_clips,
    )
    from fedfer.agent.models.video import VideoModel, from_named_arrays

    feats, probs = s.feats[s.adapt], s.probs[s.adapt]
    if oracle:
        labels, conf = pseudo_labels(list(probs))
        keep = select_clips(
            labels, conf, num_classes=6, per_class=config.per_class, p_threshold=config.p_threshold
        )
        if len(keep):
            model, r = finetune_v(
                v_arrays, pad_clips(list(feats[keep])), s.truth[s.adapt][keep], num_classes=6, config=config
            )
        else:  # nothing selected: v stays as it is, as in personalize()
            model, r = VideoModel(num_classes=6), None
            from_named_arrays(model, v_arrays)
    else:
        model, r = personalize(
            v_arrays, list(feats), list(probs), num_classes=6, config=config, dp=dp, budget=budget
        )
    pred = predict_clips(model, pad_clips(list(s.feats[s.test]))).argmax(1)
    return float((pred == s.truth[s.test]).mean()), r


def _diagnostics(s: _Subject, config: Any) -> dict[str, float]:
    """IFER pseudo-label accuracy on all adaptation clips and on the selected ones; how many were kept."""
    from fedfer.agent.learning.personalize import pseudo_labels, select_clips

    labels, conf = pseudo_labels(list(s.probs[s.adapt]))
    truth = s.truth[s.adapt]
    keep = select_clips(
        labels, conf, num_classes=6, per_class=config.per_class, p_threshold=config.p_threshold
    )
    return {
        "pseudo_accuracy": float((labels == truth).mean()),
        "selected": float(len(keep)),
        "selected_accuracy": float((labels[keep] == truth[keep]).mean()) if len(keep) else 0.0,
    }


def _before(v_model: Any, s: _Subject) -> tuple[float, float]:
    """Micro F1 of the central v and of IFER's clip-mean argmax on the subject's test half."""
    from fedfer.agent.learning.personalize import pad_clips, predict_clips

    pred = predict_clips(v_model, pad_clips(list(s.feats[s.test]))).argmax(1)
    ifer = s.probs[s.test].mean(1).argmax(1)
    return float((pred == s.truth[s.test]).mean()), float((ifer == s.truth[s.test]).mean())


def _personalization(
    args: argparse.Namespace, v_model: Any, v_arrays: dict[str, np.ndarray], subjects: list[_Subject]
) -> dict[str, Any]:
    """The reported subjects with the paper's defaults: plain, DP-SGD, and the oracle; diagnostics."""
    from fedfer.agent.learning.dp import DPConfig
    from fedfer.agent.learning.ledger import PrivacyBudget
    from fedfer.agent.learning.personalize import PersonalizeConfig
    from fedfer.agent.training.metrics import plot_subject_deltas, subject_deltas

    pcfg = PersonalizeConfig()
    before, ifer_clip, after, after_dp, oracle = {}, {}, {}, {}, {}
    diag: dict[str, dict[str, float]] = {}
    eps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in subjects:
            before[s.name], ifer_clip[s.name] = _before(v_model, s)
            diag[s.name] = _diagnostics(s, pcfg)
            after[s.name], _ = _adapt(v_arrays, s, pcfg)
            oracle[s.name], _ = _adapt(v_arrays, s, pcfg, oracle=True)
            budget = PrivacyBudget(path=Path(tmp) / f"{s.name}.json", epsilon_limit=args.dp_epsilon * 1.5)
            dp = DPConfig(target_epsilon=args.dp_epsilon)
            after_dp[s.name], r = _adapt(v_arrays, s, pcfg, dp=dp, budget=budget)
            if r.epsilon is not None:  # a run with no confident clip trains nothing and spends nothing
                eps.append(r.epsilon)
    plain, dpd, orc = (subject_deltas(before, a) for a in (after, after_dp, oracle))
    if args.plot is not None:
        title = "SIMULATED subjects: micro F1 before/after personalization"
        plot_subject_deltas(plain, args.plot, title=title)

    def mean(key: str) -> float:
        return float(np.mean([d[key] for d in diag.values()]))

    return {
        "personalization_config": repr(pcfg),
        "personalization_mean_delta": plain["mean_delta"],
        "subjects_improved": plain["improved"],
        "subjects_unchanged": plain["unchanged"],
        "subjects_worse": plain["worse"],
        "personalization_dp_mean_delta": dpd["mean_delta"],
        "subjects_dp_improved": dpd["improved"],
        "subjects_dp_worse": dpd["worse"],
        "personalization_oracle_mean_delta": orc["mean_delta"],
        "subjects_oracle_improved": orc["improved"],
        "subjects_oracle_worse": orc["worse"],
        "personalize_selected_clips_mean": mean("selected"),
        "pseudo_label_accuracy_mean": mean("pseudo_accuracy"),
        "selected_pseudo_label_accuracy_mean": mean("selected_accuracy"),
        "dp_epsilon": float(np.mean(eps)) if eps else 0.0,
        "dp_delta": 1e-5,
        "subject_micro_f1_before": before,
        "subject_micro_f1_after": after,
        "subject_micro_f1_after_dp": after_dp,
        "subject_micro_f1_after_oracle": oracle,
        "subject_ifer_clip_micro_f1": ifer_clip,
        "subject_pseudo_labels": diag,
        "subjects": args.subjects,
        "adapt_clips": args.adapt_clips,
        "test_clips": args.test_clips,
        "frames_per_clip": args.frames,
    }


def _tuning(
    args: argparse.Namespace,
    v_model: Any,
    v_arrays: dict[str, np.ndarray],
    tuning: list[_Subject],
    reported: list[_Subject],
) -> dict[str, Any]:
    """Compare personalization settings on the tuning subjects; report the best one on the main subjects."""
    from fedfer.agent.learning.personalize import PersonalizeConfig
    from fedfer.agent.training.metrics import subject_deltas

    grid: dict[str, tuple[Any, bool]] = {
        "paper lr1e-3 ep2": (PersonalizeConfig(), False),
        "lr1e-3 ep1": (PersonalizeConfig(epochs=1), False),
        "lr1e-4 ep5": (PersonalizeConfig(lr=1e-4, epochs=5), False),
        "lr1e-4 ep10": (PersonalizeConfig(lr=1e-4, epochs=10), False),
        "daffa lr1e-5 ep1": (PersonalizeConfig(lr=1e-5, epochs=1), False),
        "thr0.8 lr1e-3 ep2": (PersonalizeConfig(p_threshold=0.8), False),
        "all clips lr1e-3 ep2": (PersonalizeConfig(per_class=args.adapt_clips, p_threshold=0.0), False),
        "oracle selected lr1e-3 ep2": (PersonalizeConfig(), True),
        "oracle all lr1e-3 ep2": (PersonalizeConfig(per_class=args.adapt_clips, p_threshold=0.0), True),
    }
    before = {s.name: _before(v_model, s)[0] for s in tuning}
    table: dict[str, dict[str, float]] = {}
    for name, (cfg, oracle) in grid.items():
        after = {s.name: _adapt(v_arrays, s, cfg, oracle=oracle)[0] for s in tuning}
        d = subject_deltas(before, after)
        table[name] = {"mean_delta": d["mean_delta"], "improved": d["improved"], "worse": d["worse"]}
        _say(f"tuning {name}: mean delta {100 * d['mean_delta']:+.2f}")
    diag = [_diagnostics(s, PersonalizeConfig()) for s in tuning]
    best = max((n for n, (_, o) in grid.items() if not o), key=lambda n: table[n]["mean_delta"])
    cfg = grid[best][0]
    main_before = {s.name: _before(v_model, s)[0] for s in reported}
    tuned = subject_deltas(main_before, {s.name: _adapt(v_arrays, s, cfg)[0] for s in reported})
    return {
        "tuning_subjects": len(tuning),
        "tuning_before_mean": float(np.mean(list(before.values()))),
        "tuning_pseudo_label_accuracy_mean": float(np.mean([d["pseudo_accuracy"] for d in diag])),
        "tuning_selected_pseudo_label_accuracy_mean": float(np.mean([d["selected_accuracy"] for d in diag])),
        "tuning": table,
        "personalization_tuned_config": best,
        "personalization_tuned_mean_delta": tuned["mean_delta"],
        "subjects_tuned_improved": tuned["improved"],
        "subjects_tuned_worse": tuned["worse"],
    }


def _crema_sample(args: argparse.Namespace, net: Any, v: Any) -> dict[str, Any]:
    """The real CREMA-D sample through the full clip path with the trained IFER (restricted to 6 classes).

    Pseudo labels (argmax of mean IFER probabilities per clip) against the crowd's face-only plurality
    (FaceVote), then the per-subject protocol on the one actor: 3 clips adapt, 3 clips test.
    """
    from fedfer.agent.learning.personalize import PersonalizeConfig, pseudo_labels
    from fedfer.agent.records import CLASS_SETS
    from fedfer.agent.training.crema import corpus_features, personalize_subjects

    six = CLASS_SETS[6]
    root = args.assets / _SAMPLE
    detector = args.assets / DETECTOR_MODEL
    t0 = time.perf_counter()
    data = corpus_features(root, net, detector=detector, num_classes=6, fps=10.0)
    labels, confidence = pseudo_labels([c.probs for c in data])
    clips: list[dict[str, Any]] = [
        {
            "clip": c.clip.name,
            "acted": c.clip.acted,
            "crowd_face": six[c.label] if c.label is not None else None,
            "pseudo": six[int(p)],
            "confidence": float(q),
            "frames": len(c.features),
        }
        for c, p, q in zip(data, labels, confidence, strict=True)
    ]
    scored = [c for c in clips if c["crowd_face"] is not None]
    agree = sum(c["pseudo"] == c["crowd_face"] for c in scored) / max(len(scored), 1)
    result = personalize_subjects(data, v, actors=[1001], config=PersonalizeConfig())
    (run,) = result["runs"]
    return {
        "clips": clips,
        "crowd_labelled": len(scored),
        "pseudo_agreement_with_crowd_face": agree,
        "pseudo_agreement_with_acted": sum(c["pseudo"] == c["acted"] for c in clips) / len(clips),
        "pseudo_confident": int((confidence >= 0.5).sum()),
        "adapt_clips": run["adapt_clips"],
        "adapt_selected": run["selected"],
        "test_clips": run["test_clips"],
        "micro_f1_before": result["before"]["micro_f1"],
        "micro_f1_after": result["after"]["micro_f1"],
        "note": "6 real clips of one actor: a check of the full clip path, not an accuracy figure",
        "seconds": time.perf_counter() - t0,
    }
