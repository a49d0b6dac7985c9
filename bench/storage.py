"""``fedfer-bench storage``: latency of the aggregator's storage operations on one backend.

Measures the operations a round puts on the critical path: authenticating a device (a device lookup),
recording an idempotent response, a compare-and-set round update, and publishing/fetching a model version
the size of the video model ``v`` (with its integrity check). Prints milliseconds per operation (median).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.aggregator.registry import ModelRegistry
from fedfer.aggregator.storage import DeviceRecord, TokenRecord, open_storage, redact_url
from fedfer.security.secagg.stage import Stage

# fedfer.agent.models.video.VideoModel with K=6 (205,894 float32 parameters); the aggregator never imports
# torch.
_V_SHAPES = {
    "fc1.weight": (128, 1280),
    "fc1.bias": (128,),
    "fc2.weight": (64, 128),
    "fc2.bias": (64,),
    "lstm.weight_ih_l0": (256, 64),
    "lstm.weight_hh_l0": (256, 64),
    "lstm.bias_ih_l0": (256,),
    "lstm.bias_hh_l0": (256,),
    "out.weight": (6, 64),
    "out.bias": (6,),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the benchmark's options."""
    parser.add_argument(
        "--url", default=None, help="storage URL (default: a fresh SQLite file in a temp dir)"
    )
    parser.add_argument("--ops", type=int, default=200, help="operations per measured kind")
    parser.add_argument("--models", type=int, default=5, help="model versions to publish and fetch")


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def _time(n: int, fn: Callable[[int], object]) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return its JSON-serializable result."""
    with tempfile.TemporaryDirectory(prefix="fedfer-bench-") as tmp:
        url = args.url or f"sqlite://{Path(tmp) / 'bench.db'}"
        now = dt.datetime.now(dt.UTC)
        start = time.perf_counter()
        with open_storage(url, now=now, create=True) as store:
            open_s = time.perf_counter() - start
            tag = now.strftime("%H%M%S%f")  # lets repeated runs share one PostgreSQL database

            def enroll(i: int) -> None:
                token_hash = f"{tag}-{i}".encode().ljust(32, b"\0")
                store.add_token(
                    TokenRecord(token_hash=token_hash, created_at=now, expires_at=now + dt.timedelta(1))
                )
                store.enroll_device(
                    token_hash=token_hash,
                    now=now,
                    device=DeviceRecord(
                        device_id=f"b{tag}-{i}",
                        cert_fingerprint=f"{tag}-{i}",
                        cert_serial=int(tag) * 100_000 + i + 1,
                        identity_public_key=bytes(32),
                        created_at=now,
                    ),
                )

            enroll_t = _time(args.ops, enroll)
            lookup_t = _time(args.ops, lambda i: store.get_device(f"b{tag}-{i}"))
            respond_t = _time(
                args.ops,
                lambda i: store.record_response(
                    scope=f"b{tag}", request_id=str(i), request_digest=b"d" * 32, response=b"r" * 512, now=now
                ),
            )
            while (active := store.active_round()) is not None:
                store.update_round(
                    active.round_id, expected_version=active.version, now=now, status=Stage.ABORTED
                )
            rnd = store.create_round(params={"bench": True}, now=now)
            versions = [rnd.version]

            def advance(i: int) -> None:
                versions[0] = store.update_round(
                    rnd.round_id, expected_version=versions[0], now=now, state=b"s" * 256
                ).version

            cas_t = _time(args.ops, advance)
            store.update_round(rnd.round_id, expected_version=versions[0], now=now, status=Stage.ABORTED)
            rng = np.random.default_rng(0)  # benchmark data, not secret
            arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in _V_SHAPES.items()}
            registry = ModelRegistry(store)
            first = (store.latest_model_version() or 0) + 1
            publish_t = _time(
                args.models,
                lambda i: registry.publish(
                    first + i,
                    arrays,
                    parent=(first + i - 1) if first + i > 1 else None,
                    origin="random:seed=0",
                ),
            )
            fetch_t = _time(args.models, lambda i: registry.get(first + i))
        params = sum(int(np.prod(s)) for s in _V_SHAPES.values())
    return {
        "backend": redact_url(url).split(":", 1)[0],
        "ops": args.ops,
        "open_s": round(open_s, 3),
        "enroll_ms": _median_ms(enroll_t),
        "device_lookup_ms": _median_ms(lookup_t),
        "record_response_ms": _median_ms(respond_t),
        "round_cas_update_ms": _median_ms(cas_t),
        "model_parameters": params,
        "model_publish_ms": _median_ms(publish_t),
        "model_fetch_verified_ms": _median_ms(fetch_t),
    }
