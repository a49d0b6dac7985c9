"""``fedfer-bench edge``: the on-device vision pipeline on a real video, end to end.

decode (OpenCV) → face (MediaPipe) → f (MobileNetV2) → g (IFER head) → encrypt + store (the encrypted cache),
measured twice in one run on the same frames:

* **optimized**: batch norm folded into the convolutions, ``channels_last`` layout, crops batched across
  frames (``--batch-size``), decoding and face detection overlapped with ``f`` in a helper thread;
* **baseline**: the naive path — per-frame, default (contiguous NCHW) layout, unfused model, batch of one,
  one thread of control.

Prints one JSON object: ``frames_per_s`` (processed frames per wall-clock second, everything included; the
best of ``--repeats`` runs, with ``frames_per_s_median`` and every run in ``all_frames_per_s``),
``baseline_frames_per_s`` (best; ``baseline_frames_per_s_median``) and ``speedup`` (the issue's ratio,
``frames_per_s / baseline_frames_per_s``), per-stage milliseconds per frame of the best run (``stage_ms``:
decode, face, features = f, head = g, store = encrypt + store), ``face_ratio``, ``peak_rss_mb`` (whole
process, both set-ups) and ``bytes_per_frame`` stored in the cache.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedfer.agent.capture.video import Frame, VideoSource
from fedfer.agent.files import DETECTOR_MODEL, MOBILENET_TFLITE, assets_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the benchmark's options."""
    default_assets = str(assets_dir())
    parser.add_argument("--video", required=True, type=Path, help="video file (e.g. a CREMA-D clip)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds of video to process (the clip is looped if shorter)",
    )
    parser.add_argument(
        "--assets", type=Path, default=Path(default_assets), help="the shared real-asset folder"
    )
    parser.add_argument(
        "--sample-fps", type=float, default=None, help="frames kept per video second (default all)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="crops per forward pass (optimized run)")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch intra-op threads (OpenMP waits passively, so detection's threads are not starved)",
    )
    parser.add_argument(
        "--ifer", type=Path, default=None, help="IFER export (fedfer-agent train-ifer) instead of f + g"
    )
    parser.add_argument(
        "--emulate-quantization",
        action="store_true",
        help="f replays the TFLite graph's uint8 activation rounding (both set-ups; .tflite weights only)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive baseline run")
    parser.add_argument(
        "--no-overlap", action="store_true", help="optimized run: detect faces in the same thread as f"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternate optimized/baseline this many times; best of each"
    )


def _decoded(args: argparse.Namespace, clock: list[float]) -> Iterator[Frame]:
    """Decode live (looping the clip up to --seconds), adding the time spent decoding to ``clock[0]``."""
    offset, index = 0.0, 0
    while True:
        last = None
        with VideoSource(source=args.video, sample_fps=args.sample_fps) as src:
            frames = src.frames()
            while True:
                t0 = time.perf_counter()
                frame = next(frames, None)
                clock[0] += time.perf_counter() - t0
                if frame is None:
                    break
                last = frame
                t = offset + frame.timestamp
                if args.seconds is not None and t >= args.seconds:
                    return
                yield Frame(index=index, timestamp=t, image=frame.image)
                index += 1
            step = 1.0 / (src.native_fps or 30.0)
        if last is None or args.seconds is None:
            return
        offset += last.timestamp + step


def _detector(args: argparse.Namespace, model: Any) -> Any:
    """The face detector, cropping the way an IFER export says (its framing), else the device default."""
    from fedfer.agent.vision.faces import FaceDetector
    from fedfer.agent.vision.pipeline import ExportedIferModel

    framing = model.net.framing if isinstance(model, ExportedIferModel) else None
    if framing is None:
        return FaceDetector(model_path=args.assets / DETECTOR_MODEL)
    return FaceDetector(model_path=args.assets / DETECTOR_MODEL, margin=framing.margin, shift=framing.shift)


def _run_once(args: argparse.Namespace, *, optimized: bool, state: Path) -> dict[str, Any]:
    from fedfer.agent.store.cache import RESERVE_NAME, FeatureCache
    from fedfer.agent.vision.pipeline import VisionPipeline, load_frame_model

    batch = args.batch_size if optimized else 1
    model = load_frame_model(
        feature_weights=None if args.ifer else args.assets / MOBILENET_TFLITE,
        ifer=args.ifer,
        channels_last=optimized,
        batch_size=batch,
        fuse_batchnorm=optimized,
        emulate_tflite_quantization=args.emulate_quantization,
    )
    # Warm-up (first-call allocations, MediaPipe graph start) outside the timing, with nothing stored.
    warm_args = argparse.Namespace(**{**vars(args), "seconds": None})
    with VisionPipeline(
        detector=_detector(args, model),
        model=model,
        batch_size=batch,
        keep_records=False,
    ) as warm:
        list(warm.run(itertools.islice(_decoded(warm_args, [0.0]), max(batch, 2))))
    decode = [0.0]
    with (
        FeatureCache(state / ("cache-opt" if optimized else "cache-base")) as cache,
        VisionPipeline(
            detector=_detector(args, model),
            model=model,
            sink=cache,
            batch_size=batch,
            keep_records=False,
            overlap_detection=optimized and not args.no_overlap,
        ) as pipe,
    ):
        t0 = time.perf_counter()
        for _ in pipe.run(_decoded(args, decode)):
            pass
        wall = time.perf_counter() - t0
        stats = pipe.stats
        stored = cache.total_bytes()
        # The space reserve is a fixed 4 MiB per cache, not per frame: reported apart.
        files = [p for p in cache.directory.rglob("*") if p.is_file()]
        disk = sum(p.stat().st_size for p in files if p.name != RESERVE_NAME)
        reserve = sum(p.stat().st_size for p in files if p.name == RESERVE_NAME)
    n = max(stats.frames, 1)
    stages = {"decode": decode[0], **stats.seconds}
    return {
        "frames": stats.frames,
        "faces": stats.faces,
        "sessions": stats.sessions,
        "wall_s": round(wall, 3),
        "frames_per_s": round(stats.frames / wall, 2) if wall > 0 else 0.0,
        "stage_ms_per_frame": {k: round(v * 1000.0 / n, 3) for k, v in stages.items()},
        "bytes_per_frame": round(stored / max(stats.faces, 1), 1),
        "disk_bytes_per_frame": round(disk / max(stats.faces, 1), 1),
        "cache_reserve_bytes": reserve,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the optimized pipeline and the naive baseline on the same frames; return the JSON result."""
    # Spinning OpenMP workers collapse when the cores are shared (MediaPipe's threads, other processes):
    # measured >10x slower with 2 threads on this machine. Must be set before torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(max(1, int(args.threads)))
    with tempfile.TemporaryDirectory(prefix="fedfer-bench-edge-") as tmp:
        state = Path(tmp)
        # Alternate the two set-ups so neither always runs first on a machine whose load drifts.
        runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        for i in range(max(1, int(args.repeats))):
            for opt in (True, False) if i % 2 == 0 else (False, True):
                if opt or not args.no_baseline:
                    runs[opt].append(_run_once(args, optimized=opt, state=state / f"run{i}"))
        optimized = max(runs[True], key=lambda r: float(r["frames_per_s"]))
        baseline = max(runs[False], key=lambda r: float(r["frames_per_s"])) if runs[False] else None
    if not optimized["frames"]:
        return {"ok": False, "error": "no frames decoded"}
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB
    result: dict[str, Any] = {
        "ok": True,
        "video": args.video.name,
        "seconds": args.seconds,
        "sample_fps": args.sample_fps,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "batch_size": args.batch_size,
        "emulate_quantization": bool(args.emulate_quantization),
        "overlap_detection": not args.no_overlap,
        "repeats": max(1, int(args.repeats)),
        "all_frames_per_s": [r["frames_per_s"] for r in runs[True]],
        "all_baseline_frames_per_s": [r["frames_per_s"] for r in runs[False]],
        "frames_per_s_median": _median(runs[True]),
        "model": "ifer-export"
        if args.ifer
        else "tflite-converted f + IferHead g (untrained head: timing only)",
        "frames": optimized["frames"],
        "sessions": optimized["sessions"],
        "face_ratio": round(optimized["faces"] / max(optimized["frames"], 1), 4),
        "frames_per_s": optimized["frames_per_s"],
        "stage_ms": optimized["stage_ms_per_frame"],
        "bytes_per_frame": optimized["bytes_per_frame"],
        "disk_bytes_per_frame": optimized["disk_bytes_per_frame"],
        "cache_reserve_bytes": optimized["cache_reserve_bytes"],
        "peak_rss_mb": round(peak_rss_mb, 1),
        "goals": {"frames_per_s": 30, "peak_rss_mb": 700},
    }
    if baseline is not None:
        result["baseline_frames_per_s"] = baseline["frames_per_s"]
        result["baseline_frames_per_s_median"] = _median(runs[False])
        result["baseline_stage_ms"] = baseline["stage_ms_per_frame"]
        result["speedup"] = (
            round(optimized["frames_per_s"] / baseline["frames_per_s"], 2)
            if baseline["frames_per_s"]
            else None
        )
    result["meets_goals"] = result["frames_per_s"] >= 30 and result["peak_rss_mb"] <= 700
    return result


def _median(runs: list[dict[str, Any]]) -> float:
    return round(float(statistics.median(float(r["frames_per_s"]) for r in runs)), 2)
