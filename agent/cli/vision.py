"""``fedfer-agent`` commands of the vision area.

* ``extract --video PATH --state DIR``: run the vision pipeline on a video (or camera ``camera:N``, or a
  stream URL) and store its sessions in the encrypted cache under ``DIR/cache`` (what the daemon uses).
  Prints a JSON summary (counts and session ids, never features). A missing ``--detector`` file is downloaded
  (``--detector-url``, default MediaPipe's) into the agent's cache folder and verified against the pin.
* ``fetch-weights --dest DIR [--url URL --sha256 HEX]``: download torchvision's MobileNetV2 ImageNet weights
  (or any pinned file) with digest verification.

Heavy imports (torch, mediapipe) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from fedfer.agent.files import DETECTOR_MODEL, MOBILENET_TFLITE, assets_dir


def _source(text: str) -> int | str:
    if text.startswith("camera:") and text[len("camera:") :].isdigit():
        return int(text[len("camera:") :])
    return text


def _extract(args: argparse.Namespace) -> int:
    # Passive OpenMP waiting keeps torch from spinning against MediaPipe's threads (set before torch loads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from fedfer.agent.capture.video import VideoSource
    from fedfer.agent.models.weights import MEDIAPIPE_FACE_DETECTOR
    from fedfer.agent.store.cache import FeatureCache
    from fedfer.agent.store.device import CACHE_DIR
    from fedfer.agent.vision.faces import FaceDetector, detector_model_file
    from fedfer.agent.vision.pipeline import VisionPipeline, load_frame_model

    torch.set_num_threads(max(1, args.threads))
    assets = args.assets if args.assets is not None else assets_dir()
    with contextlib.ExitStack() as stack:
        # Open the source first: a missing file or absent camera fails before any model is loaded.
        src = stack.enter_context(
            VideoSource(source=_source(args.video), sample_fps=args.sample_fps, max_frames=args.max_frames)
        )
        if args.ifer is None and args.head is None:
            logging.getLogger(__name__).warning(
                "no --ifer or --head given: features are real, IFER probabilities come from an untrained head"
            )
        model = load_frame_model(
            ifer=args.ifer,
            feature_weights=None if args.ifer else (args.weights or assets / MOBILENET_TFLITE),
            head=args.head,
            num_classes=args.classes,
            batch_size=args.batch_size,
            emulate_tflite_quantization=args.emulate_quantization,
        )
        detector = stack.enter_context(
            FaceDetector(
                # A missing detector file is downloaded (pinned SHA-256) into the agent's model folder.
                model_path=detector_model_file(
                    args.detector or assets / DETECTOR_MODEL,
                    url=args.detector_url or MEDIAPIPE_FACE_DETECTOR.url,
                ),
                margin=args.margin,
                min_confidence=args.min_score,
            )
        )
        cache = stack.enter_context(FeatureCache(Path(args.state) / CACHE_DIR))
        pipe = VisionPipeline(
            detector=detector,
            model=model,
            sink=cache,
            batch_size=args.batch_size,
            session_gap_s=args.session_gap,
            keep_records=False,
        )
        summary: dict[str, Any] = {"sessions": []}
        try:
            for session in pipe.run(src.frames()):
                summary["sessions"].append({"id": session.session_id, "frames": session.frames})
        finally:
            summary.update(frames=pipe.stats.frames, faces=pipe.stats.faces)
            print(json.dumps(summary, sort_keys=True))
    return 0


def _fetch_weights(args: argparse.Namespace) -> int:
    from fedfer.agent.models.weights import TORCHVISION_MOBILENET_V2, PinnedFile, ensure_file

    pinned = TORCHVISION_MOBILENET_V2
    if args.url:
        if not args.sha256:
            from fedfer.security.errors import ValidationError

            raise ValidationError("--url needs --sha256")
        pinned = PinnedFile(
            url=args.url, sha256=args.sha256.lower(), filename=Path(args.url).name or "model.bin"
        )
    path = ensure_file(pinned, download_dir=args.dest)
    print(json.dumps({"path": str(path), "sha256_pin": pinned.sha256}, sort_keys=True))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's sub-commands to ``sub``."""
    p = sub.add_parser("extract", help="video → faces → features → encrypted cache")
    p.add_argument("--video", required=True, help="video file, camera:N or stream URL")
    p.add_argument("--state", required=True, type=Path, help="agent state directory (cache in DIR/cache)")
    p.add_argument("--assets", type=Path, default=None, help="real-asset folder ($FEDFER_ASSETS)")
    p.add_argument(
        "--weights", type=Path, default=None, help="MobileNetV2 weights (.tflite or torchvision .pth)"
    )
    p.add_argument("--ifer", type=Path, default=None, help="IFER export (manifest): fedfer-agent train-ifer")
    p.add_argument("--head", type=Path, default=None, help="IferHead state dict (with --weights)")
    p.add_argument("--classes", type=int, default=6, choices=(4, 6, 7))
    p.add_argument(
        "--emulate-quantization",
        action="store_true",
        help="replay the TFLite graph's uint8 activation rounding in f (.tflite weights; closer, slower)",
    )
    p.add_argument("--detector", type=Path, default=None, help="MediaPipe face detector .tflite (pinned)")
    p.add_argument(
        "--detector-url",
        default=None,
        help="where a missing detector file is downloaded from (default MediaPipe's; pinned SHA-256)",
    )
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--min-score", type=float, default=0.5)
    p.add_argument("--sample-fps", type=float, default=None)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--session-gap", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(handler=_extract)

    p = sub.add_parser("fetch-weights", help="download pinned MobileNetV2 ImageNet weights")
    p.add_argument("--dest", required=True, type=Path)
    p.add_argument("--url", default=None)
    p.add_argument("--sha256", default=None)
    p.set_defaults(handler=_fetch_weights)
