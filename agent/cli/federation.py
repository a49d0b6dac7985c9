"""``fedfer-agent`` commands of the federation area: ``enroll``, ``fetch-model``, ``join-round``.

``enroll --token-file PATH`` reads the one-time token from a file only its owner can read, or with
``--token-file -`` from the first line of stdin (``fedfer-aggregator token DIR | fedfer-agent enroll ...``);
a token is never accepted on the command line, which any local user can read in ``/proc/*/cmdline``.

``join-round --update FILE.npz`` reads the update (the delta from the round's base model, flattened in
manifest order) from an ``.npz`` holding either one 1-D array ``update`` or named arrays matching the
model's manifest, plus an optional integer ``weight`` (default 1, or ``--weight``). It prints one JSON line
with the outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedfer.security.errors import FedferError, ValidationError

_MAX_TOKEN_TEXT = 1024


class AggregatorRefusedError(FedferError):
    """The aggregator answered a federation command with an error status (its message is sanitized)."""


def _rpc_errors_as_fedfer(
    handler: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Turn a gRPC failure into a one-line fedfer error (status name and the aggregator's fixed message)."""

    def wrapped(args: argparse.Namespace) -> int:
        import grpc

        try:
            return handler(args)
        except grpc.aio.AioRpcError as exc:
            raise AggregatorRefusedError(f"{exc.code().name}: {exc.details()}") from None

    return wrapped


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's sub-commands to ``sub``."""
    # No abbreviations: `--token SECRET` must be refused, not taken as a prefix of --token-file.
    p = sub.add_parser(
        "enroll", help="enroll this device with an aggregator (one-time token)", allow_abbrev=False
    )
    p.add_argument("--server", required=True, help="HOST:PORT of the aggregator's enrollment endpoint")
    p.add_argument("--ca", required=True, type=Path, help="the deployment CA certificate (PEM)")
    p.add_argument(
        "--token-file",
        required=True,
        help="file holding the one-time enrollment token (mode 0600), or - to read it from stdin (it is "
        "never taken from the command line, which other users can read)",
    )
    p.add_argument("--state", required=True, type=Path, help="federation state directory")
    p.add_argument("--device-id", default=None, help="requested device id (default: random)")
    p.set_defaults(handler=_rpc_errors_as_fedfer(_enroll))

    p = sub.add_parser("fetch-model", help="download and verify the central model")
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--version", default="", help="model version (default: latest)")
    p.add_argument("--out", type=Path, default=None, help="write the arrays to this .npz")
    p.set_defaults(handler=_rpc_errors_as_fedfer(_fetch_model))

    p = sub.add_parser("join-round", help="take part in the next secure-aggregation round")
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--update", required=True, type=Path, help=".npz with the update (see module docs)")
    p.add_argument("--weight", type=int, default=None, help="integer weight (example count)")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--rounds", type=int, default=1, help="stop after this many published rounds")
    p.add_argument("--attempts", type=int, default=None, help="most rounds to try (default: rounds + 2)")
    p.set_defaults(handler=_rpc_errors_as_fedfer(_join_round))


def _read_token(source: str) -> str:
    """The enrollment token from a file only its owner can read, or from the first line of stdin (``-``)."""
    if source == "-":
        text = sys.stdin.readline(_MAX_TOKEN_TEXT)
    else:
        try:
            with open(source, encoding="utf-8") as fh:
                if os.fstat(fh.fileno()).st_mode & 0o077:
                    raise ValidationError("the token file is readable by other users; chmod 600 it")
                text = fh.read(_MAX_TOKEN_TEXT)
        except (OSError, UnicodeDecodeError):
            raise ValidationError("cannot read the token file") from None
    token = text.strip()
    if not token:
        raise ValidationError("no enrollment token in the token file")
    return token


def _enroll(args: argparse.Namespace) -> int:
    from fedfer.agent.federation.enroll import enroll

    token = _read_token(args.token_file)
    try:
        ca_pem = args.ca.read_bytes()
    except OSError as exc:
        raise ValidationError("cannot read the CA certificate") from exc
    state = asyncio.run(
        enroll(
            server=args.server,
            ca_pem=ca_pem,
            token=token,
            state_dir=args.state,
            device_id=args.device_id,
        )
    )
    print(json.dumps({"device_id": state.device_id, "server": state.target}))
    return 0


def _fetch_model(args: argparse.Namespace) -> int:
    from fedfer.agent.federation.client import FederationClient
    from fedfer.agent.federation.state import DeviceState

    async def go() -> Any:
        async with FederationClient(state=DeviceState.load(args.state)) as client:
            return await client.fetch_model(args.version)

    model = asyncio.run(go())
    if args.out is not None:
        np.savez(args.out, **model.arrays)
    print(json.dumps({"version": model.version, "sha256": model.sha256, "arrays": list(model.arrays)}))
    return 0


def _load_update(path: Path) -> tuple[dict[str, npt.NDArray[Any]], int | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError) as exc:
        raise ValidationError("cannot read the update file (expected .npz)") from exc
    weight_arr = arrays.pop("weight", None)
    weight = None
    if weight_arr is not None:
        if weight_arr.shape != () or weight_arr.dtype.kind not in "iu":
            raise ValidationError("weight in the update file must be an integer scalar")
        weight = int(weight_arr)
    if not arrays:
        raise ValidationError("update file holds no arrays")
    return arrays, weight


def _join_round(args: argparse.Namespace) -> int:
    from fedfer.agent.federation.client import FederationClient
    from fedfer.agent.federation.retry import RetryPolicy
    from fedfer.agent.federation.state import DeviceState

    arrays, file_weight = _load_update(args.update)
    weight = args.weight if args.weight is not None else (file_weight if file_weight is not None else 1)

    async def update_fn(base_version: str, dim: int) -> tuple[npt.NDArray[np.float64], int]:
        if set(arrays) == {"update"}:
            flat = np.asarray(arrays["update"], dtype=np.float64).ravel()
        else:
            flat = np.concatenate([np.asarray(arrays[n], dtype=np.float64).ravel() for n in sorted(arrays)])
        if flat.shape != (dim,):
            raise ValidationError("update length does not match the round's model")
        return flat, weight

    policy = RetryPolicy(attempts=40, initial_s=0.2, max_s=2.0)

    async def go() -> int:
        published = 0
        attempts = args.attempts if args.attempts is not None else args.rounds + 2
        async with FederationClient(state=DeviceState.load(args.state), policy=policy) as client:
            for _ in range(attempts):
                if published >= args.rounds:
                    break
                outcome = await client.join_round(update_fn, timeout_s=args.timeout_s)
                print(json.dumps(asdict(outcome) | {"wire_bytes": client.counter.total}), flush=True)
                published += outcome.status == "published"
        return 0 if published >= args.rounds else 4

    return asyncio.run(go())
