"""``fedfer-agent`` commands of the learning area.

* ``train-ifer --data DIR --classes {4,6,7}``: IFER (f's last blocks + g) on an ImageFolder set.
* ``eval-ifer --model M --data DIR [--json]``: the paper's table for any ImageFolder set.
* ``train-vfer --corpus crema-d --root DIR --ifer M``: central v on CREMA-D's subject-disjoint splits;
  ``--corpus fer2013``: the central v every device starts from, on FER2013-derived clips (the shipped one);
  ``--corpus taiwanese --performers ...``: v on the labelled photos of the performers named.
* ``personalize-corpus --corpus crema-d --root DIR --ifer M --vfer V``: per-subject adaptation (halves),
  optional DP; ``--corpus taiwanese``: the per-performer protocol (adapt on types 0-2, test on type 3) and
  secure FedAvg over performers (``--rounds``).
* ``release-ifer --from M --fer DIR --out DIR``: the shipped IFER from a trained export (framing measured on
  FER2013, test-time views, float16).

Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedfer.agent.files import DETECTOR_MODEL, MOBILENET_TFLITE, assets_dir


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def _train_ifer(args: argparse.Namespace) -> int:
    from fedfer.agent.training.data import dev_split, list_image_folder
    from fedfer.agent.training.metrics import format_report

    _threads(args.threads)
    root: Path = args.data / "train" if (args.data / "train").is_dir() else args.data
    items = list_image_folder(root, args.classes)
    if args.limit:
        from fedfer.agent.training.data import hash_order

        items = hash_order(items)[: args.limit]
    dev, train = dev_split(items)
    weights = args.weights or assets_dir() / MOBILENET_TFLITE

    def epoch(rec: dict[str, float]) -> None:
        print(
            f"epoch {int(rec['epoch'])} loss {rec['loss']:.4f} dev macro F1 {100 * rec['dev_macro_f1']:.1f} "
            f"lr {rec['lr']:.2g}",
            file=sys.stderr,
            flush=True,
        )

    if args.recipe:
        manifest, rep = _train_ifer_recipe(args, weights, train, dev, epoch)
    else:
        manifest, rep = _train_ifer_cached(args, weights, train, dev, epoch)
    print(format_report(rep, title="IFER on the dev split"))
    print(f"model: {manifest}")
    return 0


def _train_ifer_recipe(
    args: argparse.Namespace, weights: Path, train: list[Any], dev: list[Any], epoch: Any
) -> tuple[Path, Any]:
    """The benchmark's recipe (augmented fine-tuning of f, then g's class biases fitted on dev), cached."""
    import dataclasses

    from fedfer.agent.training.ifer import load_images
    from fedfer.agent.training.metrics import classification_report
    from fedfer.agent.training.recipe import IferRecipe, calibrate_or_load, train_or_load_ifer

    base = IferRecipe()
    train_cfg = base.train
    if args.epochs is not None:
        warmup = min(train_cfg.warmup_epochs, args.epochs / 4)
        train_cfg = dataclasses.replace(train_cfg, epochs=args.epochs, warmup_epochs=warmup)
    if args.batch_size is not None:
        train_cfg = dataclasses.replace(train_cfg, batch_size=args.batch_size)
    recipe = dataclasses.replace(
        base,
        num_classes=args.classes,
        input_size=args.input_size or base.input_size,
        split=base.split if args.split is None else args.split,
        train=train_cfg,
    )
    trained, run = train_or_load_ifer(
        recipe, weights=weights, train_items=train, dev_items=dev, progress=epoch
    )
    if run.cached:
        print(f"loaded the model trained earlier on the same recipe and data ({run.key})", file=sys.stderr)
    net, cal = calibrate_or_load(trained, run, dev_items=dev)
    print(
        f"g's class biases fitted on the dev split: macro F1 {100 * cal.dev_macro_f1_before:.1f} -> "
        f"{100 * cal.dev_macro_f1:.1f}",
        file=sys.stderr,
    )
    _, probs = net.infer(load_images(dev))
    rep = classification_report([it.label for it in dev], probs.argmax(1), net.classes)
    return cal.manifest, rep


def _train_ifer_cached(
    args: argparse.Namespace, weights: Path, train: list[Any], dev: list[Any], epoch: Any
) -> tuple[Path, Any]:
    """f's last blocks and g on cached frozen-prefix activations (fast; no augmentation but mirroring)."""
    import numpy as np

    from fedfer.agent.files import cache_dir
    from fedfer.agent.models.export import content_key
    from fedfer.agent.models.ifer import FaceNet, load_backbone, save_ifer
    from fedfer.agent.training.cached import files_digest
    from fedfer.agent.training.ifer import IferTrainConfig, evaluate_ifer, prefix_activations, train_ifer

    items = dev + train
    n_dev = len(dev)
    backbone, norm = load_backbone(weights)
    net = FaceNet(
        backbone=backbone,
        normalization=norm,
        num_classes=args.classes,
        input_size=args.input_size or 112,
        split=14 if args.split is None else args.split,
    )

    def shown(done: int, total: int) -> None:
        print(f"features {done}/{total}", file=sys.stderr, flush=True)

    acts = prefix_activations(net, items, flips=args.flips, progress=shown)
    labels = np.array([it.label for it in items])
    cfg = IferTrainConfig(epochs=args.epochs or 6, lr=args.lr, batch_size=args.batch_size or 64)
    res = train_ifer(
        net, acts[:, n_dev:], labels[n_dev:], acts[0, :n_dev], labels[:n_dev], config=cfg, progress=epoch
    )
    rep, _ = evaluate_ifer(net, acts[0, :n_dev], labels[:n_dev])
    key = content_key(
        "cli-ifer/1", net.identity(), files_digest((it.path for it in items), labels.tolist()), repr(cfg)
    )
    out = args.out or cache_dir("models") / key
    manifest = save_ifer(net, out, extra={"history": res.history, "dev": rep.as_dict()})
    return manifest, rep


def _eval_ifer(args: argparse.Namespace) -> int:
    import numpy as np

    from fedfer.agent.models.ifer import load_ifer
    from fedfer.agent.training.data import list_image_folder, read_gray
    from fedfer.agent.training.metrics import classification_report, format_report

    _threads(args.threads)
    net = load_ifer(args.model)
    items = list_image_folder(args.data, net.num_classes)
    if args.limit:
        from fedfer.agent.training.data import hash_order

        items = hash_order(items)[: args.limit]
    preds = []
    for s in range(0, len(items), 256):
        _, p = net.infer(np.stack([read_gray(it.path) for it in items[s : s + 256]]))
        preds.append(p.argmax(1))
    rep = classification_report([it.label for it in items], np.concatenate(preds), net.classes)
    if args.json:
        print(json.dumps(rep.as_dict(), sort_keys=True))
    else:
        print(format_report(rep, title=f"IFER on {args.data}"))
    return 0


def _ifer(args: argparse.Namespace) -> Any:
    """The IFER export named by ``--ifer``, else the shipped one (verified)."""
    from fedfer.agent.models.ifer import load_ifer
    from fedfer.agent.models.shipped import shipped_ifer

    return load_ifer(args.ifer or shipped_ifer())


def _crema(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    from fedfer.agent.training.crema import corpus_features

    net = _ifer(args)
    data = corpus_features(
        args.root,
        net,
        detector=args.detector or assets_dir() / DETECTOR_MODEL,
        modality=args.modality,
        num_classes=net.num_classes,
        fps=args.fps,
    )
    return net, data


def _performer_ids(spec: str) -> tuple[int, ...]:
    """``dev``, ``test`` or comma-separated performer ids."""
    from fedfer.agent.errors import DatasetError
    from fedfer.agent.training import taiwanese as tw

    if spec in ("dev", "test"):
        return tw.DEV_PERFORMERS if spec == "dev" else tw.TEST_PERFORMERS
    try:
        return tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError:
        raise DatasetError("--performers takes dev, test or comma-separated ids") from None


def _taiwanese(args: argparse.Namespace, net: Any, performers: tuple[int, ...]) -> list[Any]:
    from fedfer.agent.errors import DatasetError
    from fedfer.agent.training import taiwanese as tw

    photos = [p for p in tw.scan(args.root) if p.performer in performers]
    if not photos:
        raise DatasetError(f"no photo of performers {list(performers)} under {args.root}")
    return tw.photo_features(photos, net, detector=args.detector or assets_dir() / DETECTOR_MODEL)


def _train_vfer_fer(args: argparse.Namespace) -> int:
    """The central v on FER2013-derived clips (what the aggregator publishes as version 1)."""
    import shutil

    from fedfer.agent.training.central import train_or_load_central_v
    from fedfer.agent.training.data import dev_split, list_image_folder
    from fedfer.agent.training.vfer import load_vfer, save_vfer

    net = _ifer(args)
    root: Path = args.root / "train" if (args.root / "train").is_dir() else args.root
    dev, train = dev_split(list_image_folder(root, net.num_classes))
    v, run = train_or_load_central_v(net, train_items=train, dev_items=dev, num_classes=args.classes)
    meta = json.loads(run.manifest.read_text(encoding="utf-8"))
    keep = {
        k: meta[k] for k in ("trained_on", "ifer_inference_digest", "cache_key", "best_epoch") if k in meta
    }
    keep["dev_macro_f1"] = run.dev_macro_f1
    if args.float16:
        manifest = save_vfer(v, args.out, extra=keep, storage="float16")
        load_vfer(manifest)  # read back: the float16 copy loads
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for f in (run.manifest, run.manifest.with_suffix(".npz")):
            shutil.copyfile(f, args.out / f.name)
        manifest = args.out / run.manifest.name
    how = "loaded from the cache" if run.cached else "trained"
    print(f"central v ({args.classes} classes) {how}: FER2013 dev macro F1 {100 * run.dev_macro_f1:.1f}")
    print(f"model: {manifest}")
    return 0


def _train_vfer_taiwanese(args: argparse.Namespace) -> int:
    """v on the labelled photos of the performers named (every type; clips = the corpus groups)."""
    import numpy as np

    from fedfer.agent.errors import DatasetError
    from fedfer.agent.learning.personalize import pad_clips
    from fedfer.agent.training import taiwanese as tw
    from fedfer.agent.training.vfer import VferTrainConfig, save_vfer, train_vfer

    if not args.performers or args.performers in ("dev", "test"):
        raise DatasetError("--corpus taiwanese trains on the performers named by id (--performers 1,2,3)")
    net = _ifer(args)
    people = tw.person_clips(
        _taiwanese(args, net, _performer_ids(args.performers)),
        net.classes,
        num_classes=args.classes,
        split=tw.Split("all", adapt=(0, 1, 2, 3), test=()),
    )
    clips = [c for p in people for c in p.adapt]
    if len(clips) < 2:
        raise DatasetError("not enough labelled clips to train on")
    x = pad_clips([c.features for c in clips])
    y = np.array([c.label for c in clips], np.int64)
    model, res = train_vfer(
        x, y, x, y, num_classes=args.classes, config=VferTrainConfig(epochs=args.epochs, lr=args.lr)
    )
    extra = {"trained_on": f"taiwanese performers {args.performers}", "history": res.history}
    manifest = save_vfer(model, args.out, extra=extra)
    print(f"v on {len(clips)} clips of {len(people)} performers; model: {manifest}")
    return 0


def _train_vfer(args: argparse.Namespace) -> int:
    import numpy as np

    from fedfer.agent.errors import DatasetError
    from fedfer.agent.learning.personalize import pad_clips, predict_clips
    from fedfer.agent.training.crema import split_of
    from fedfer.agent.training.metrics import classification_report, format_report
    from fedfer.agent.training.vfer import VferTrainConfig, save_vfer, train_vfer

    _threads(args.threads)
    if args.corpus == "fer2013":
        return _train_vfer_fer(args)
    if args.corpus == "taiwanese":
        return _train_vfer_taiwanese(args)
    net, data = _crema(args)
    parts = split_of(data, args.root)
    actors = {k: sorted({c.clip.actor for c in v}) for k, v in parts.items()}
    empty = [k for k, v in parts.items() if not v]
    if empty:
        raise DatasetError(
            f"the corpus at {args.root} has no labelled clips for the {', '.join(empty)} split(s)"
        )
    length = args.max_frames

    def xy(part: str) -> tuple[Any, Any]:
        return (
            pad_clips([c.features for c in parts[part]], length),
            np.array([c.label for c in parts[part]], dtype=np.int64),
        )

    (x, y), (dx, dy), (tx, ty) = xy("train"), xy("dev"), xy("test")
    soft = None
    if args.partial_labels is not None:
        from fedfer.agent.training.data import read_crema_responses
        from fedfer.agent.training.vfer import soft_targets

        counts = read_crema_responses(
            args.partial_labels, modality=args.modality, num_classes=net.num_classes
        )
        eye = np.eye(net.num_classes, dtype=np.int64)
        rows = []
        for c in parts["train"]:
            vec = counts.get(c.clip.name)
            rows.append(vec if vec is not None and vec.sum() > 0 else eye[c.label])
        soft = soft_targets(np.stack(rows))
    model, res = train_vfer(
        x,
        y,
        dx,
        dy,
        num_classes=net.num_classes,
        config=VferTrainConfig(epochs=args.epochs, lr=args.lr),
        soft=soft,
    )
    rep = classification_report(ty, predict_clips(model, tx).argmax(1), net.classes)
    extra = {
        "history": res.history,
        "test": rep.as_dict(),
        "split_actors": actors,
        "targets": "partial" if soft is not None else "hard",
        "modality": args.modality,
    }
    manifest = save_vfer(model, args.out, extra=extra)
    for part in ("train", "dev", "test"):
        print(f"{part}: {len(parts[part])} clips of {len(actors[part])} actors", file=sys.stderr)
    print(format_report(rep, title="VFER on the CREMA-D test split (subject-disjoint)"))
    print(f"model: {manifest}")
    return 0


def _scored_actors(args: argparse.Namespace, data: list[Any]) -> tuple[list[int], str]:
    """The actors to score and how they were chosen: ``--subject``, else the corpus' test-split actors.

    Raises:
        DatasetError: none of them has a clip under ``--root``.
    """
    from fedfer.agent.errors import DatasetError
    from fedfer.agent.training.crema import corpus_split

    present = {c.clip.actor for c in data}
    if args.subject:
        actors, source = sorted(set(args.subject)), "--subject"
    else:
        split = corpus_split(args.root)
        actors, source = list(split.test), f"the test split ({len(split.test)} actors)"
        if not present & set(actors):
            where = sorted({split.of(a) for a in present})
            raise DatasetError(
                f"no clip of the {len(actors)} test-split actors under {args.root} (its actors are in the "
                f"{'/'.join(where)} split); choose actors with --subject"
            )
    if not present & set(actors):
        raise DatasetError(f"no clip of the chosen actors under {args.root}")
    return actors, source


def _dp_config(args: argparse.Namespace) -> Any:
    """DP-SGD settings from ``--dp-epsilon`` or ``--dp-noise-multiplier`` (``None``: DP off)."""
    from fedfer.agent.learning.dp import DPConfig

    if args.dp_epsilon is None and args.dp_noise_multiplier is None:
        return None
    return DPConfig(
        target_epsilon=args.dp_epsilon,
        noise_multiplier=args.dp_noise_multiplier,
        delta=args.dp_delta,
        max_grad_norm=args.dp_max_grad_norm,
    )


def _print_personalization(result: dict[str, Any]) -> None:
    """The paper's tables (per class P/R/F1, macro and micro; before and after) and per-subject deltas."""
    from fedfer.agent.training.metrics import ClassReport, format_report, format_subject_deltas

    n = len(result["actors"])
    print(f"scored actors ({result['actors_from']}): {', '.join(str(a) for a in result['actors'])}")
    for when in ("before", "after"):
        title = f"{when} personalization: pooled test halves of {n} subject(s)"
        print(format_report(ClassReport.from_dict(result[when]), title=title))
        print()
    print(format_subject_deltas(result["subjects"]))
    for rec in result.get("fedavg", []):
        r = rec["report"]
        print(
            f"central v after {rec['round']} FedAvg round(s): micro F1 {100 * r['micro_f1']:.1f} "
            f"(macro {100 * r['macro_f1']:.1f})"
        )


def _personalize_taiwanese(args: argparse.Namespace) -> int:
    """The per-performer protocol on the Taiwanese corpus, and secure FedAvg over performers."""
    from fedfer.agent.models.video import to_named_arrays
    from fedfer.agent.training import taiwanese as tw
    from fedfer.agent.training.metrics import (
        ClassReport,
        format_report,
        format_subject_deltas,
        plot_subject_deltas,
    )
    from fedfer.agent.training.people import METHODS, personalize_people, secure_fedavg
    from fedfer.agent.training.vfer import load_vfer

    dp = _dp_config(args)
    net = _ifer(args)
    v = load_vfer(args.vfer)
    group = args.performers or "test"
    feats = _taiwanese(args, net, _performer_ids(group))
    split = tw.FORWARD if args.split == "forward" else tw.REVERSE
    people = tw.person_clips(feats, net.classes, num_classes=v.num_classes, split=split)
    central = to_named_arrays(v)
    method = METHODS[args.method]
    result = personalize_people(people, central, num_classes=v.num_classes, method=method, dp=dp)
    result["performers"] = group
    if args.rounds:
        fed = tw.FEDERATING.get(group, ()) or tuple(int(p.person) for p in people[: len(people) // 2])
        got = secure_fedavg(
            [p for p in people if int(p.person) in fed],
            [p for p in people if int(p.person) not in fed],
            central,
            num_classes=v.num_classes,
            method=method,
            rounds=args.rounds,
        )
        result["fedavg"] = [
            {k: r[k] for k in ("round", "clip", "image", "contributors")} for r in got["rounds"]
        ]
    if args.plot is not None:
        plot_subject_deltas(result["summary"][args.level], args.plot)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(f"performers ({group}), {args.split} split, method {method.name}: {method.description}")
    for when in ("before", "after"):
        report = ClassReport.from_dict(result["table"][args.level][when])
        print(format_report(report, title=f"{when} personalization ({args.level} level, pooled tests)"))
        print()
    print(format_subject_deltas(result["summary"][args.level]))
    for rec in result.get("fedavg", []):
        r = rec[args.level]
        print(
            f"central v after {rec['round']} secure FedAvg round(s), unseen performers: micro F1 "
            f"{100 * r['micro_f1']:.1f} (macro {100 * r['macro_f1']:.1f})"
        )
    return 0


def _release_ifer(args: argparse.Namespace) -> int:
    from fedfer.agent.training.data import hash_order, list_image_folder
    from fedfer.agent.training.ifer import load_images
    from fedfer.agent.training.release import measure_framing, release_ifer

    root: Path = args.fer / "train" if (args.fer / "train").is_dir() else args.fer
    faces = list(load_images(hash_order(list_image_folder(root, 7))[: args.framing_faces]))
    measured = measure_framing(faces, detector=args.detector or assets_dir() / DETECTOR_MODEL)
    manifest = release_ifer(
        args.source, args.out, framing=measured.framing, extra={"framing_measure": measured.as_dict()}
    )
    m = measured.framing
    print(
        f"framing measured on {measured.detected} of {measured.faces} FER2013 faces: margin {m.margin}, "
        f"shift {m.shift}"
    )
    print(f"model: {manifest}")
    return 0


def _personalize(args: argparse.Namespace) -> int:
    from fedfer.agent.learning.personalize import PersonalizeConfig
    from fedfer.agent.training.crema import personalize_subjects
    from fedfer.agent.training.metrics import plot_subject_deltas
    from fedfer.agent.training.vfer import load_vfer

    _threads(args.threads)
    if args.corpus == "taiwanese":
        return _personalize_taiwanese(args)
    dp = _dp_config(args)  # bad DP settings fail before any clip is read
    _net, data = _crema(args)
    v = load_vfer(args.vfer)
    actors, source = _scored_actors(args, data)
    config = PersonalizeConfig(
        per_class=args.per_class, p_threshold=args.p_threshold, lr=args.lr, epochs=args.epochs
    )
    result = personalize_subjects(
        data,
        v,
        actors=actors,
        config=config,
        dp=dp,
        budget_dir=args.budget_dir,
        epsilon_limit=args.epsilon_limit,
    )
    result["actors_from"] = source
    if args.rounds:
        from fedfer.agent.training.crema import fedavg_rounds

        result["fedavg"] = fedavg_rounds(data, v, rounds=args.rounds, actors=actors, config=config)
    if args.plot is not None:
        plot_subject_deltas(result["subjects"], args.plot)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        _print_personalization(result)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's sub-commands to ``sub``."""
    p = sub.add_parser("train-ifer", help="train IFER (f's last blocks + g) on ImageFolder face images")
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root (or a folder holding train/)")
    p.add_argument("--classes", type=int, choices=(4, 6, 7), default=6)
    p.add_argument("--weights", type=Path, default=None, help="MobileNetV2 weights (TFLite or torchvision)")
    p.add_argument(
        "--recipe",
        action="store_true",
        help="the benchmark's recipe: all of f fine-tuned on augmented faces at 64x64 (slow, best; cached "
        "by content hash, --out and --flips do not apply)",
    )
    p.add_argument("--input-size", type=int, default=None, help="network input side (112; recipe: 64)")
    p.add_argument(
        "--split",
        type=int,
        default=None,
        help="first trainable block (19 = frozen f; default 14, recipe 1)",
    )
    p.add_argument("--epochs", type=int, default=None, help="6; recipe: 15")
    p.add_argument("--lr", type=float, default=1e-3, help="g's learning rate (cached-activation trainer)")
    p.add_argument("--batch-size", type=int, default=None, help="64")
    p.add_argument("--flips", action="store_true", help="mirror augmentation (doubles feature extraction)")
    p.add_argument("--limit", type=int, default=0, help="use only this many images (0 = all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out", type=Path, default=None, help="export folder (default: the cache, by content hash)"
    )
    p.set_defaults(handler=_train_ifer)

    p = sub.add_parser("eval-ifer", help="evaluate an IFER export on an ImageFolder set")
    p.add_argument("--model", type=Path, required=True, help="manifest (.json) or its folder")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_eval_ifer)

    for name, handler, text in (
        ("train-vfer", _train_vfer, "train the video model v on a CREMA-D layout"),
        (
            "personalize-corpus",
            _personalize,
            "per-subject personalization of v on a labelled corpus (halves), optional DP",
        ),
    ):
        p = sub.add_parser(name, help=text)
        corpora = ("crema-d", "fer2013", "taiwanese") if name == "train-vfer" else ("crema-d", "taiwanese")
        p.add_argument("--corpus", choices=corpora, default="crema-d")
        p.add_argument(
            "--root",
            type=Path,
            required=True,
            help="crema-d: clips + summaryTable.csv + VideoDemographics.csv; fer2013: its folder; "
            "taiwanese: the corpus folder (faces_256x256/)",
        )
        p.add_argument("--ifer", type=Path, default=None, help="IFER export (default: the shipped one)")
        p.add_argument(
            "--performers", default=None, help="taiwanese: dev, test (default) or comma-separated ids"
        )
        p.add_argument("--modality", choices=("face", "voice", "audiovisual"), default="face")
        p.add_argument("--detector", type=Path, default=None)
        p.add_argument("--fps", type=float, default=10.0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--epochs", type=int, default=20 if name == "train-vfer" else 2)
        p.add_argument("--lr", type=float, default=1e-3)
        p.set_defaults(handler=handler)
        if name == "train-vfer":
            p.add_argument("--out", type=Path, required=True)
            p.add_argument("--classes", type=int, choices=(4, 6, 7), default=6, help="fer2013/taiwanese: K")
            p.add_argument("--float16", action="store_true", help="fer2013: store the export as float16")
            p.add_argument("--max-frames", type=int, default=None, help="pad/truncate clips to this length")
            p.add_argument(
                "--partial-labels",
                type=Path,
                default=None,
                help="finishedResponses.csv of the full corpus: train on vote distributions (KL loss)",
            )
        else:
            p.add_argument("--vfer", type=Path, required=True)
            p.add_argument(
                "--subject",
                type=int,
                action="append",
                help="actor id to score (repeatable; default: the test-split actors, 31 on the full corpus)",
            )
            p.add_argument("--method", choices=("paper", "biases"), default="biases", help="taiwanese")
            p.add_argument("--split", choices=("forward", "reverse"), default="forward", help="taiwanese")
            p.add_argument("--level", choices=("image", "clip"), default="image", help="taiwanese: tables")
            p.add_argument("--per-class", type=int, default=50)
            p.add_argument("--p-threshold", type=float, default=0.5)
            noise = p.add_mutually_exclusive_group()
            noise.add_argument("--dp-epsilon", type=float, default=None, help="DP-SGD by target epsilon")
            noise.add_argument(
                "--dp-noise-multiplier", type=float, default=None, help="DP-SGD by noise multiplier"
            )
            p.add_argument("--dp-delta", type=float, default=1e-5)
            p.add_argument("--dp-max-grad-norm", type=float, default=1.0, help="per-sample clipping norm")
            p.add_argument("--budget-dir", type=Path, default=None, help="per-device budget files")
            p.add_argument("--epsilon-limit", type=float, default=10.0)
            p.add_argument("--plot", type=Path, default=None)
            p.add_argument("--rounds", type=int, default=0, help="also run N FedAvg rounds (Table 6 format)")
            p.add_argument("--json", action="store_true")
    p = sub.add_parser(
        "release-ifer", help="the shipped IFER from a trained export (framing, views, float16)"
    )
    p.add_argument("--from", dest="source", type=Path, required=True, help="trained IFER export (.json)")
    p.add_argument(
        "--fer", type=Path, required=True, help="FER2013 folder (its train faces give the framing)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--framing-faces", type=int, default=1000, help="faces measured (hash order)")
    p.add_argument("--detector", type=Path, default=None)
    p.set_defaults(handler=_release_ifer)
