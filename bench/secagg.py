"""``fedfer-bench secagg``: one whole secure-aggregation round in-process, against the keystream bound.

Every client and the server run for real (X25519, Ed25519, Shamir, AES-GCM, AES-CTR masks, canonical message
encoding and decoding); only the network is missing. The seed chooses who drops out and the plaintext
updates, never any secret (all secrets come from the OS CSPRNG).

Reported compute is CPU time of this process (``time.process_time``), so other jobs on a shared machine
inflate it less than wall time would. ``bound_ratio`` = (all clients' compute + server compute) /
(keystream bytes the protocol must generate / keystream rate), where the rate is the faster of AES-256-CTR
and ChaCha20 from ``cryptography`` measured in the same run (best of one measurement before and one after
the round, which makes the ratio conservative).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from fedfer.security.crypto import KEYSTREAM_ALGORITHMS, Keystream
from fedfer.security.errors import RoundAbortedError
from fedfer.security.keys import AgreementKey, IdentityKey, verify_signature
from fedfer.security.secagg import NeighbourGraph, SecAggClient, SecAggParams, SecAggServer, decode_message

_DROP_STAGES = ("advertise", "share", "masked", "consistency", "unmask", "mixed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this benchmark's options to its sub-command parser."""
    parser.add_argument("--clients", type=int, default=100, help="number of clients n")
    parser.add_argument(
        "--dim", type=int, default=208_582, help="update length (default: the paper's v; ours has 205,894)"
    )
    parser.add_argument("--dropout", type=float, default=0.1, help="fraction of clients that drop out")
    parser.add_argument("--neighbors", type=int, default=None, help="graph degree (default: SecAgg+ default)")
    parser.add_argument("--complete", action="store_true", help="use the complete graph (classic SecAgg)")
    parser.add_argument("--threshold", type=int, default=None, help="Shamir threshold t (default: majority)")
    parser.add_argument("--seed", type=int, default=0, help="drives dropouts and plaintexts only")
    parser.add_argument("--max-weight", type=int, default=100, help="largest client weight")
    parser.add_argument("--clip", type=float, default=1.0, help="clipping bound c")
    parser.add_argument(
        "--measure-seconds", type=float, default=0.4, help="time spent measuring each keystream and key op"
    )
    parser.add_argument(
        "--drop-stage",
        choices=_DROP_STAGES,
        default="masked",
        help="where dropped clients vanish (default: after sharing keys, before the masked input)",
    )


def _measure_prg(nbytes: int, seconds: float = 0.4) -> dict[str, float]:
    rates: dict[str, float] = {}
    for algorithm in KEYSTREAM_ALGORITHMS:
        stream = Keystream(nbytes=nbytes, algorithm=algorithm)
        key = os.urandom(32)
        stream.generate(key)
        calls = 0
        start = time.process_time()
        elapsed = 0.0
        while elapsed < seconds or calls < 3:
            stream.generate(key)
            calls += 1
            elapsed = time.process_time() - start
        rates[algorithm] = calls * nbytes / elapsed
    return rates


def _measure_public_key_ops(seconds: float = 0.2) -> tuple[float, float]:
    """CPU seconds per Ed25519 verification and per X25519 agreement (+HKDF), through
    ``fedfer.security.keys``."""
    signer = IdentityKey.generate()
    payload = os.urandom(143)
    signature = signer.sign(payload)
    public = signer.public_bytes()
    mine = AgreementKey.generate()
    peer = AgreementKey.generate().public_bytes()
    costs = []
    for op in (
        lambda: verify_signature(public, payload, signature),
        lambda: mine.derive(peer, info=b"fedfer/bench/agreement", salt=payload[:32]),
    ):
        calls = 0
        start = time.process_time()
        elapsed = 0.0
        while elapsed < seconds or calls < 10:
            op()
            calls += 1
            elapsed = time.process_time() - start
        costs.append(elapsed / calls)
    return costs[0], costs[1]


def _count_public_key_ops(params: SecAggParams, drop_at: dict[int, str]) -> tuple[int, int]:
    """Signature verifications and key agreements the protocol must do (all clients plus the server)."""
    graph = NeighbourGraph(params)
    everyone = set(range(1, params.num_clients + 1))
    u1 = {u for u in everyone if drop_at.get(u) != "advertise"}
    u2 = {u for u in u1 if drop_at.get(u) != "share"}
    u3 = {u for u in u2 if drop_at.get(u) != "masked"}
    verifies = len(u1)  # the server checks every advertisement
    agreements = 0
    for u in u2:  # clients that shared keys verified and agreed with each advertised neighbour
        verifies += len(u1 & graph.neighbors(u))
        agreements += len(u1 & graph.neighbors(u))
    for u in u3:  # clients that masked agreed a mask seed with each neighbour that shared keys
        agreements += len(u2 & graph.neighbors(u))
    for u in u2 - u3:  # the server re-derives the dropped clients' seeds with their surviving neighbours
        agreements += len(u3 & graph.neighbors(u))
    u4 = {u for u in u3 if drop_at.get(u) != "consistency"}
    verifies += len(u4)  # the server checks every consistency-check signature
    for u in u4:  # a client checks t - 1 of its neighbours' signatures before it unmasks
        if drop_at.get(u) != "unmask" and len(u4 & graph.holders(u)) >= params.threshold:
            verifies += params.threshold - 1
    return verifies, agreements


class _Clock:
    """Accumulates CPU time per party."""

    def __init__(self) -> None:
        self.client: dict[int, float] = {}
        self.server = 0.0

    def add_client(self, cid: int, seconds: float) -> None:
        self.client[cid] = self.client.get(cid, 0.0) + seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one round and return the measurements (``ok`` is false if the round aborted)."""
    n = int(args.clients)
    dim = int(args.dim)
    neighbors = n - 1 if args.complete else args.neighbors
    params = SecAggParams.create(
        round_id=os.urandom(32),
        num_clients=n,
        dim=dim,
        neighbors=neighbors,
        threshold=args.threshold,
        clip=float(args.clip),
        max_weight=int(args.max_weight),
    )
    rng = np.random.default_rng(args.seed)
    n_drop = round(float(args.dropout) * n)
    dropped = sorted(int(x) + 1 for x in rng.choice(n, size=n_drop, replace=False))
    stages = _DROP_STAGES[:-1]
    drop_at: dict[int, str] = {}
    for i, cid in enumerate(dropped):
        drop_at[cid] = stages[i % len(stages)] if args.drop_stage == "mixed" else args.drop_stage
    weights = {
        cid: int(w)
        for cid, w in zip(range(1, n + 1), rng.integers(1, params.max_weight + 1, size=n), strict=True)
    }

    def update_of(cid: int) -> npt.NDArray[np.float32]:
        # Updates bigger than the clip range on purpose, so clipping is exercised too.
        return np.random.default_rng([args.seed, cid]).uniform(-1.2, 1.2, size=dim).astype(np.float32)

    measure_s = float(args.measure_seconds)
    prg_before = _measure_prg(params.vector_length * 4, measure_s)

    identities = {cid: IdentityKey.generate() for cid in range(1, n + 1)}
    roster = {cid: key.public_bytes() for cid, key in identities.items()}
    clock = _Clock()
    upload: dict[int, int] = dict.fromkeys(range(1, n + 1), 0)

    t0 = time.process_time()
    server = SecAggServer(params=params, identity_keys=roster)
    clock.server += time.process_time() - t0
    clients: dict[int, SecAggClient] = {}
    for cid in range(1, n + 1):
        t0 = time.process_time()
        clients[cid] = SecAggClient(
            params=params, client_id=cid, identity_key=identities[cid], identity_keys=roster
        )
        clock.add_client(cid, time.process_time() - t0)

    def client_step(cid: int, incoming: bytes | None, call: Any) -> bytes:
        t0 = time.process_time()
        msg_in = decode_message(incoming) if incoming is not None else None
        out: bytes = call(msg_in).to_bytes()
        clock.add_client(cid, time.process_time() - t0)
        upload[cid] += len(out)
        return out

    def server_receive(data: bytes) -> None:
        t0 = time.process_time()
        server.receive(decode_message(data))
        clock.server += time.process_time() - t0

    def server_close() -> dict[int, bytes]:
        t0 = time.process_time()
        out = {cid: msg.to_bytes() for cid, msg in server.close_stage().items()}
        clock.server += time.process_time() - t0
        return out

    oracle = np.zeros(dim, dtype=np.float64)
    oracle_weight = 0
    aborted: str | None = None
    try:
        for cid, c in clients.items():
            if drop_at.get(cid) != "advertise":
                server_receive(client_step(cid, None, lambda _m, c=c: c.advertise_keys()))
        outbox = server_close()
        for cid, data in outbox.items():
            if drop_at.get(cid) != "share":
                server_receive(client_step(cid, data, clients[cid].share_keys))
        outbox = server_close()
        for cid, data in outbox.items():
            if drop_at.get(cid) == "masked":
                continue
            x = update_of(cid)
            w = weights[cid]
            # Every masked input that arrives is in the sum, even if its sender drops before unmasking.
            oracle += w * np.clip(x.astype(np.float64), -params.clip, params.clip)
            oracle_weight += w
            server_receive(
                client_step(
                    cid, data, lambda m, c=clients[cid], x=x, w=w: c.masked_input(m, update=x, weight=w)
                )
            )
        outbox = server_close()
        for cid, data in outbox.items():
            if drop_at.get(cid) != "consistency":
                server_receive(client_step(cid, data, clients[cid].consistency_check))
        outbox = server_close()
        for cid, data in outbox.items():
            if drop_at.get(cid) != "unmask":
                server_receive(client_step(cid, data, clients[cid].unmask))
        server_close()
    except RoundAbortedError as exc:
        aborted = str(exc)

    prg_after = _measure_prg(params.vector_length * 4, measure_s)
    verify_cost, agreement_cost = _measure_public_key_ops(measure_s / 2)
    verifies, agreements = _count_public_key_ops(params, drop_at)
    rates = {a: max(prg_before[a], prg_after[a]) for a in KEYSTREAM_ALGORITHMS}
    best = max(rates, key=lambda a: rates[a])
    client_bytes = sum(c.mask_bytes_generated for c in clients.values())
    keystream_bytes = client_bytes + server.mask_bytes_generated
    client_total = sum(clock.client.values())
    total = client_total + clock.server
    result: dict[str, Any] = {
        "ok": aborted is None,
        "clients": n,
        "dim": dim,
        "neighbors": params.neighbors,
        "complete_graph": params.complete_graph,
        "threshold": params.threshold,
        "dropped": n_drop,
        "drop_stage": args.drop_stage,
        "client_s": statistics.median(clock.client.values()),
        "clients_total_s": client_total,
        "server_s": clock.server,
        "prg_algorithm": "aes-256-ctr",
        "prg_fastest": best,
        "prg_bytes_per_s": rates[best],
        "prg_rates": rates,
        "keystream_bytes": keystream_bytes,
        "server_keystream_bytes": server.mask_bytes_generated,
        "modulus_bits": params.modulus_bits,
        "seed": args.seed,
    }
    survivors = [cid for cid in range(1, n + 1) if cid not in drop_at]
    per_client = [upload[cid] for cid in survivors]
    if per_client:
        result["upload_bytes_per_client"] = statistics.median(per_client)
        result["upload_overhead_vs_float32"] = statistics.median(per_client) / (4 * dim)
    result["signature_verifications"] = verifies
    result["key_agreements"] = agreements
    result["verify_s_est"] = verifies * verify_cost
    result["agreement_s_est"] = agreements * agreement_cost
    if keystream_bytes:
        keystream_s = keystream_bytes / rates[best]
        result["keystream_s"] = keystream_s
        result["bound_ratio"] = total / keystream_s
        # What the ratio would be if nothing but keystream, signature checks and key agreement cost anything.
        result["bound_ratio_floor"] = (
            keystream_s + verifies * verify_cost + agreements * agreement_cost
        ) / keystream_s
    if aborted is not None:
        result["error"] = aborted
        return result
    agg = server.result()
    exact = oracle / float(oracle_weight)
    result["max_abs_error"] = float(np.max(np.abs(agg.mean() - exact)))
    result["error_bound"] = agg.error_bound
    result["total_weight"] = agg.total_weight
    result["survivors"] = len(agg.survivors)
    result["ok"] = bool(agg.total_weight == oracle_weight and result["max_abs_error"] <= agg.error_bound)
    return result
