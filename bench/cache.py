"""``fedfer-bench cache``: throughput and footprint of the encrypted feature cache.

Measures, in one run and one fresh cache directory: per-frame appends (one transaction each), batched
appends (one transaction per batch), ``end_session`` (the seal with its KEK rotation), verified reads,
``forget`` (crypto-shredding with KEK rotation and WAL truncation), stored bytes per frame (ciphertext and
on-disk file size), and an at-rest scan of the directory (which must come out clean). Frames are realistic
stand-ins: sparse non-negative float16 features of MobileNetV2's 1,280 dimensions, softmax probabilities, a
box and a score.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.agent.records import FrameRecord
from fedfer.agent.store.cache import DB_NAME, FeatureCache
from fedfer.bench.atrest import scan_paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the benchmark's options."""
    parser.add_argument("--frames", type=int, default=3000, help="frames written in batches")
    parser.add_argument("--single", type=int, default=300, help="frames written one transaction each")
    parser.add_argument("--batch", type=int, default=30, help="frames per batched transaction")
    parser.add_argument("--classes", type=int, default=7, help="IFER classes per frame (K)")
    parser.add_argument(
        "--synchronous", choices=("FULL", "NORMAL"), default="FULL", help="SQLite durability level"
    )


def _frames(n: int, classes: int, seed: int) -> list[FrameRecord]:
    rng = np.random.default_rng(seed)  # benchmark content only: nothing secret comes from this RNG
    features = np.clip(rng.gamma(0.7, 0.9, size=(n, 1280)), 0, 6) * (rng.random((n, 1280)) > 0.15)
    probs = rng.dirichlet(np.ones(classes), size=n).astype(np.float32)
    return [
        FrameRecord(
            timestamp=i / 29.97,
            feature=features[i].astype(np.float16),
            ifer_probs=probs[i],
            box=(120.0, 60.0, 180.0, 200.0),
            score=0.95,
        )
        for i in range(n)
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return its JSON-ready result."""
    frames: int = args.frames
    single: int = args.single
    batch: int = args.batch
    if frames <= 0 or single <= 0 or batch <= 0 or args.classes <= 0:
        raise SystemExit("--frames, --single, --batch and --classes must be positive")
    records = _frames(frames, args.classes, seed=0)
    with tempfile.TemporaryDirectory(prefix="fedfer-bench-cache-") as tmp:
        directory = Path(tmp) / "cache"
        with FeatureCache(directory, synchronous=args.synchronous) as cache:
            sid = cache.begin_session()
            start = time.perf_counter()
            for record in records[:single]:
                cache.append(sid, record)
            single_s = time.perf_counter() - start

            sid = cache.begin_session()
            start = time.perf_counter()
            for i in range(0, frames, batch):
                cache.append_batch(sid, records[i : i + batch])
            batch_s = time.perf_counter() - start
            start = time.perf_counter()
            cache.end_session(sid)  # seal record, re-wrapped data key and KEK rotation in one transaction
            seal_s = time.perf_counter() - start

            start = time.perf_counter()
            back = cache.read_session(sid)
            read_s = time.perf_counter() - start
            ok = len(back) == frames and np.array_equal(back[-1].feature, records[-1].feature)

            cache.rotate_kek()  # folds the WAL into the database file so the size below is final
            stored = sum(p.stat().st_size for p in directory.glob(DB_NAME + "*"))
            record_bytes = cache.session_info(sid).bytes / frames

            start = time.perf_counter()
            report = scan_paths([directory])
            scan_s = time.perf_counter() - start

            start = time.perf_counter()
            cache.forget(sid)
            forget_s = time.perf_counter() - start
    return {
        "ok": bool(ok and report.clean),
        "synchronous": args.synchronous,
        "classes": args.classes,
        "append_single_records_per_s": round(single / single_s, 1),
        "append_batch_records_per_s": round(frames / batch_s, 1),
        "batch": batch,
        "batch_vs_single_speedup": round((frames / batch_s) / (single / single_s), 2),
        "read_records_per_s": round(frames / read_s, 1),
        "record_bytes_per_frame": round(record_bytes, 1),
        "disk_bytes_per_frame": round(stored / (frames + single), 1),
        "seal_ms": round(seal_s * 1000, 2),
        "forget_ms": round(forget_s * 1000, 2),
        "atrest_scan_clean": report.clean,
        "atrest_scan_mb_per_s": round(report.bytes_scanned / 1e6 / scan_s, 1),
        "cpu_count": os.cpu_count(),
    }
