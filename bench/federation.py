"""``fedfer-bench federation``: one secure-aggregation round over real gRPC (loopback TLS 1.3, mutual TLS).

The aggregator runs as a real ``fedfer-aggregator serve`` subprocess on a fresh deployment (SQLite); the
devices are enrolled over the enrollment port and then run as asyncio tasks spread over ``--procs`` worker
processes, each with its own mutual-TLS channel, driving
:class:`fedfer.agent.federation.client.FederationClient` exactly as a device would. A ``--dropout`` fraction
of devices vanishes after sharing keys (the costly case: the aggregator must rebuild their pairwise masks), so
the masked-input stage closes at its deadline.

Reported:

* ``round_s``: wall time from the first device's join to the last survivor learning the published version;
  ``deadline_wait_s`` is the part spent waiting for the masked-input deadline after the last survivor's upload
  (zero without dropouts), and ``round_s_excl_wait`` the rest.
* ``bytes_up_per_client``: median (the lower middle one) over survivors of the bytes each device put on the
  wire during the round, all stages and status polls included, **measured**: every device's connection goes
  through its own loopback TCP proxy (:class:`fedfer.bench.tcp_proxy.TcpProxy`) that counts client-to-server
  bytes above TCP, i.e. TLS records with the TLS handshake included (``tls_handshake_included``), HTTP/2
  frames and gRPC messages; TCP/IP headers are not counted. ``bytes_up_per_client_max`` is the largest
  device's. ``wire_overhead`` and ``wire_overhead_max`` divide them by the raw float32 size of the update (4
  bytes x dim); ``wire_overhead_excl_handshake`` first subtracts each connection's set-up bytes (TLS handshake
  with the device certificate, HTTP/2 preface and settings: ``connection_setup_bytes_up``, measured on a
  channel that only connects). ``wire_overhead_estimated`` is the client's own estimate
  (:class:`fedfer.agent.federation.client.WireCounter`: serialized requests + framing + a per-call header
  guess).
* ``server_cpu_s``: user + system CPU time of the aggregator process during the round (from ``/proc``).
* ``max_abs_error``: published model minus previous model vs. the plaintext FedAvg oracle of the survivors.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

_BIN = Path(sys.executable).parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this benchmark's options to its sub-command parser."""
    parser.add_argument("--clients", type=int, default=100, help="number of devices")
    parser.add_argument(
        "--dim", type=int, default=208_582, help="update length (default: the paper's v; ours has 205,894)"
    )
    parser.add_argument(
        "--dropout", type=float, default=0.1, help="fraction of devices that vanish mid-round"
    )
    parser.add_argument("--neighbors", type=int, default=None, help="SecAgg+ degree (default: O(log n))")
    parser.add_argument("--complete", action="store_true", help="complete graph (classic SecAgg)")
    parser.add_argument("--procs", type=int, default=2, help="worker processes the devices are spread over")
    parser.add_argument("--deadline-s", type=float, default=30.0, help="per-stage deadline at the aggregator")
    parser.add_argument("--seed", type=int, default=0, help="drives the plaintext updates and who drops")
    parser.add_argument("--max-weight", type=int, default=100, help="largest device weight")


def _update(seed: int, index: int, dim: int, max_weight: int) -> tuple[npt.NDArray[np.float64], int]:
    rng = np.random.default_rng([seed, index])
    return rng.normal(0.0, 0.3, dim), int(rng.integers(1, max_weight + 1))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def connection_setup_bytes(state: Any) -> int:
    """Bytes a device sends to open one mutual-TLS channel (TLS handshake, HTTP/2 preface and settings),
    measured through a counting proxy on a channel that connects and does nothing else."""
    from fedfer.agent.federation.channel import federation_channel
    from fedfer.bench.tcp_proxy import TcpProxy

    proxy = TcpProxy((state.host, state.port))
    await proxy.start()
    try:
        channel = federation_channel(dataclasses.replace(state, port=proxy.port))
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        await asyncio.sleep(0.2)  # let the settings acknowledgement through
        await channel.close()
        return proxy.bytes_up
    finally:
        await proxy.close()


def _worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run some devices as asyncio tasks in this process, each through its own counting proxy; return one
    record per device."""
    from fedfer.agent.federation.client import FederationClient
    from fedfer.agent.federation.retry import RetryPolicy
    from fedfer.agent.federation.state import DeviceState
    from fedfer.bench.tcp_proxy import TcpProxy
    from fedfer.security.secagg.stage import Stage

    async def device(state_dir: str, index: int, drop: bool) -> dict[str, Any]:
        update, weight = _update(spec["seed"], index, spec["dim"], spec["max_weight"])
        record: dict[str, Any] = {"index": index, "drop": drop, "weight": weight}
        vanish = asyncio.Event()

        async def hang() -> None:
            record["vanished"] = True
            await vanish.wait()

        async def uploaded() -> None:
            record["uploaded_at"] = time.time()

        async def update_fn(base: str, dim: int) -> tuple[npt.NDArray[np.float64], int]:
            record.setdefault("joined_at", time.time())
            return update, weight

        hooks = {"share_keys": hang} if drop else {"masked_input": uploaded}
        state = DeviceState.load(Path(state_dir))
        proxy = TcpProxy((state.host, state.port))  # this device's wire: counts what it uploads
        await proxy.start()
        client = FederationClient(
            state=dataclasses.replace(state, port=proxy.port),
            hooks=hooks,
            policy=RetryPolicy(attempts=20, max_s=2.0),
            poll_ms=10_000,
            rpc_timeout_s=300,
        )
        try:
            async with client:
                outcome = await client.join_round(update_fn, timeout_s=spec["timeout_s"], rounds_to_try=1)
                record.update(
                    status=outcome.status,
                    version=outcome.model_version,
                    done_at=time.time(),
                    wire_up=proxy.bytes_up,
                    connections=proxy.connections,
                    estimated_up=client.counter.total,
                    payload_up=client.counter.payload,
                    calls=client.counter.calls,
                    masked_deadline=client.stage_deadlines.get(Stage.MASKED_INPUT, 0) / 1000,
                )
        finally:
            await proxy.close()
        return record

    async def main() -> list[dict[str, Any]]:
        tasks = {asyncio.create_task(device(d, i, drop)): i for d, i, drop in spec["devices"]}
        dropping = {i for _, i, drop in spec["devices"] if drop}
        survivors = [t for t, i in tasks.items() if i not in dropping]
        done = await asyncio.gather(*survivors)
        for t in tasks:
            if not t.done():
                t.cancel()
        return list(done)

    return asyncio.run(main())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one round and return the measurements."""
    from fedfer.agent.federation.enroll import enroll
    from fedfer.agent.federation.state import DeviceState
    from fedfer.aggregator.config import RoundConfig, StageDeadlines, init_deployment
    from fedfer.aggregator.enrollment import issue_token
    from fedfer.aggregator.registry import ModelRegistry
    from fedfer.aggregator.storage import open_storage

    n, dim = int(args.clients), int(args.dim)
    if n < 3 or dim < 1 or not 0 <= args.dropout < 0.5:
        raise SystemExit("need --clients >= 3, --dim >= 1 and 0 <= --dropout < 0.5")
    dropped = set(
        np.random.default_rng(args.seed).choice(n, size=round(n * args.dropout), replace=False).tolist()
    )
    with tempfile.TemporaryDirectory(prefix="fedfer-bench-") as tmp:
        root = Path(tmp)
        deadlines = StageDeadlines(
            advertise_keys_s=args.deadline_s, share_keys_s=args.deadline_s,
            masked_input_s=args.deadline_s, consistency_check_s=args.deadline_s, unmask_s=args.deadline_s,
        )  # fmt: skip
        config = init_deployment(
            root / "agg",
            listen="127.0.0.1:0",
            rounds=RoundConfig(
                min_clients=n,
                max_clients=n,
                secagg_plus=not args.complete,
                neighbours=args.neighbors,
                deadlines=deadlines,
            ),
        )
        base = np.random.default_rng([args.seed, 10**6]).standard_normal(dim).astype(np.float32)
        with open_storage(config.storage_url) as storage:
            ModelRegistry(storage).publish(1, {"v": base}, parent=None, origin=f"random:seed={args.seed}")
            tokens = [issue_token(storage, now=dt.datetime.now(dt.UTC)).token for _ in range(n)]
        ports_file = root / "ports.json"
        log = (root / "serve.log").open("wb")
        server = subprocess.Popen(
            [str(_BIN / "fedfer-aggregator"), "serve", "--config", str(config.source), "--ports-file",
             str(ports_file), "--rounds", "1", "--checkin-s", "2", "--max-weight", str(args.max_weight),
             "--max-dim", str(dim)],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not ports_file.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("aggregator did not start")
                time.sleep(0.05)
            ports = json.loads(ports_file.read_text())
            ca_pem = config.tls.ca_cert.read_bytes()

            async def enroll_all() -> list[str]:
                sem = asyncio.Semaphore(16)

                async def one(i: int) -> str:
                    async with sem:
                        state = await enroll(
                            server=f"127.0.0.1:{ports['enroll_port']}",
                            ca_pem=ca_pem,
                            token=tokens[i],
                            state_dir=root / f"dev{i}",
                        )
                    return str(state.directory)

                return list(await asyncio.gather(*(one(i) for i in range(n))))

            states = asyncio.run(enroll_all())
            setup_up = asyncio.run(connection_setup_bytes(DeviceState.load(Path(states[0]))))
            cpu_before = _cpu_seconds(server.pid)
            procs = max(1, int(args.procs))
            specs = [
                {
                    "seed": args.seed,
                    "dim": dim,
                    "max_weight": args.max_weight,
                    "timeout_s": 30 * args.deadline_s + 600,
                    "devices": [(states[i], i, i in dropped) for i in range(p, n, procs)],
                }
                for p in range(procs)
            ]
            started = time.time()
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=procs, mp_context=ctx) as pool:
                records = [r for part in pool.map(_worker, specs) for r in part]
            cpu_after = _cpu_seconds(server.pid)
            with open_storage(config.storage_url) as storage:
                registry = ModelRegistry(storage)
                published = registry.latest()
                before = registry.get(1).arrays["v"].astype(np.float64)
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
    survivors = [r for r in records if not r["drop"]]
    ok = (
        published is not None
        and published.version == 2
        and all(r["status"] == "published" for r in survivors)
    )
    result: dict[str, Any] = {
        "ok": ok,
        "clients": n,
        "dim": dim,
        "dropout": args.dropout,
        "dropped": len(dropped),
    }
    if not ok or published is None:
        return result | {"statuses": sorted({r["status"] for r in survivors})}
    weights = {r["index"]: r["weight"] for r in survivors}
    total_weight = sum(weights.values())
    oracle = sum(
        w * np.clip(_update(args.seed, i, dim, args.max_weight)[0], -1.0, 1.0) for i, w in weights.items()
    )
    oracle = oracle / total_weight
    error = float(np.max(np.abs(published.arrays["v"].astype(np.float64) - before - oracle)))
    done = max(r["done_at"] for r in survivors)
    last_upload = max(r["uploaded_at"] for r in survivors)
    round_s = done - min(r.get("joined_at", started) for r in records if "joined_at" in r)
    wait = 0.0
    if dropped:  # the masked-input stage then closes at its deadline, announced to every device
        wait = max(0.0, max(r["masked_deadline"] for r in survivors) - last_upload)
    raw = 4 * dim
    wire = [r["wire_up"] for r in survivors]
    no_setup = [r["wire_up"] - r["connections"] * setup_up for r in survivors]
    estimated = statistics.median(r["estimated_up"] for r in survivors)
    # The median device's own count (median_low): a whole number of bytes that the overhead is computed from.
    median_wire = int(statistics.median_low(wire))
    return result | {
        "neighbors": "complete" if args.complete else (args.neighbors or "default"),
        "procs": int(args.procs),
        "round_s": round(round_s, 3),
        "deadline_wait_s": round(wait, 3),
        "round_s_excl_wait": round(round_s - wait, 3),
        "max_abs_error": error,
        "bytes_up_per_client": median_wire,
        "bytes_up_per_client_max": int(max(wire)),
        "payload_up_per_client": int(statistics.median(r["payload_up"] for r in survivors)),
        "calls_per_client": int(statistics.median(r["calls"] for r in survivors)),
        "connections_per_client": int(statistics.median(r["connections"] for r in survivors)),
        "connection_setup_bytes_up": setup_up,
        "tls_handshake_included": True,
        "raw_update_bytes": raw,
        "wire_overhead": round(median_wire / raw, 4),
        "wire_overhead_max": round(max(wire) / raw, 4),
        "wire_overhead_excl_handshake": round(statistics.median_low(no_setup) / raw, 4),
        "wire_overhead_estimated": round(estimated / raw, 4),
        "server_cpu_s": round(cpu_after - cpu_before, 3),
        "published_version": published.version,
    }
