"""Drive whole secure-aggregation rounds in-process for the secagg tests (real crypto, real encoding)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedfer.security.errors import FedferError
from fedfer.security.keys import IdentityKey
from fedfer.security.secagg import (
    AggregateResult,
    NeighbourGraph,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    Stage,
    decode_message,
)
from fedfer.security.secagg.messages import Message

STAGES = ("advertise", "share", "masked", "consistency", "unmask")


@dataclass
class Round:
    """Everything one in-process round needs."""

    params: SecAggParams
    identities: dict[int, IdentityKey]
    roster: dict[int, bytes]
    server: SecAggServer
    clients: dict[int, SecAggClient]
    graph: NeighbourGraph
    log: list[str] = field(default_factory=list)


def make_round(
    n: int,
    dim: int,
    *,
    neighbors: int | None = None,
    threshold: int | None = None,
    max_weight: int = 5,
    clip: float = 1.0,
    modulus_bits: int = 32,
    round_id: bytes | None = None,
    identities: dict[int, IdentityKey] | None = None,
) -> Round:
    """Set up a server and n clients with fresh identity keys."""
    params = SecAggParams.create(
        round_id=os.urandom(32) if round_id is None else round_id,
        num_clients=n,
        dim=dim,
        neighbors=neighbors,
        threshold=threshold,
        clip=clip,
        max_weight=max_weight,
        modulus_bits=modulus_bits,
    )
    ids = identities if identities is not None else {i: IdentityKey.generate() for i in range(1, n + 1)}
    roster = {i: k.public_bytes() for i, k in ids.items()}
    server = SecAggServer(params=params, identity_keys=roster)
    clients = {
        i: SecAggClient(params=params, client_id=i, identity_key=ids[i], identity_keys=roster)
        for i in range(1, n + 1)
    }
    return Round(params, ids, roster, server, clients, NeighbourGraph(params))


def wire(message: Message) -> Message:
    """Send a message through its canonical encoding, as a transport would."""
    return decode_message(message.to_bytes())


def random_inputs(
    n: int, dim: int, max_weight: int, seed: int
) -> tuple[dict[int, npt.NDArray[np.float32]], dict[int, int]]:
    """Plaintext updates (some outside the clip range) and weights for clients 1..n."""
    rng = np.random.default_rng(seed)
    updates = {i: rng.uniform(-1.5, 1.5, size=dim).astype(np.float32) for i in range(1, n + 1)}
    weights = {i: int(rng.integers(1, max_weight + 1)) for i in range(1, n + 1)}
    return updates, weights


def run_round(
    rnd: Round,
    updates: Mapping[int, npt.NDArray[np.float32]],
    weights: Mapping[int, int],
    drops: Mapping[int, str] | None = None,
    *,
    tamper: Callable[[str, int, Message], Message] | None = None,
    client_errors: dict[int, Exception] | None = None,
) -> AggregateResult:
    """Run every stage; ``drops[id] = stage`` makes that client send nothing from that stage on.

    ``tamper(stage, client_id, message)`` may replace a server->client message before delivery. If
    ``client_errors`` is a dict, a client that raises a FedferError is recorded there and treated as dropped
    (what a transport does); otherwise the error propagates. Server errors always propagate
    (RoundAbortedError when too few survive).
    """
    drops = dict(drops or {})

    def alive(cid: int, stage: str) -> bool:
        d = drops.get(cid)
        return d is None or STAGES.index(d) > STAGES.index(stage)

    def guard(stage: str, cid: int, fn: Callable[[], Message]) -> None:
        try:
            out = fn()
        except FedferError as exc:
            if client_errors is None:
                raise
            client_errors[cid] = exc
            drops[cid] = stage
            return
        server.receive(wire(out))

    def deliver(stage: str, cid: int, msg: Message) -> Message:
        msg = wire(msg)
        return tamper(stage, cid, msg) if tamper is not None else msg

    server = rnd.server
    for cid, client in rnd.clients.items():
        if alive(cid, "advertise"):
            guard("advertise", cid, client.advertise_keys)
    for cid, msg in server.close_stage().items():
        if alive(cid, "share"):
            c, m = rnd.clients[cid], deliver("share", cid, msg)
            guard("share", cid, lambda c=c, m=m: c.share_keys(m))  # type: ignore[misc]
    for cid, msg in server.close_stage().items():
        if alive(cid, "masked"):
            c, m = rnd.clients[cid], deliver("masked", cid, msg)
            guard(
                "masked",
                cid,
                lambda c=c, m=m, cid=cid: c.masked_input(m, update=updates[cid], weight=weights[cid]),  # type: ignore[misc]
            )
    for cid, msg in server.close_stage().items():
        if alive(cid, "consistency"):
            c, m = rnd.clients[cid], deliver("consistency", cid, msg)
            guard("consistency", cid, lambda c=c, m=m: c.consistency_check(m))  # type: ignore[misc]
    for cid, msg in server.close_stage().items():
        if alive(cid, "unmask"):
            c, m = rnd.clients[cid], deliver("unmask", cid, msg)
            guard("unmask", cid, lambda c=c, m=m: c.unmask(m))  # type: ignore[misc]
    server.close_stage()
    return server.result()


def oracle(
    updates: Mapping[int, npt.NDArray[np.float32]],
    weights: Mapping[int, int],
    survivors: set[int],
    clip: float,
) -> tuple[npt.NDArray[np.float64], int]:
    """Plaintext FedAvg of the survivors' clipped updates: (mean, total weight)."""
    total_weight = sum(weights[i] for i in survivors)
    acc = sum(weights[i] * np.clip(updates[i].astype(np.float64), -clip, clip) for i in survivors)
    return np.asarray(acc, dtype=np.float64) / total_weight, total_weight


def expected_outcome(
    params: SecAggParams, graph: NeighbourGraph, drops: Mapping[int, str]
) -> set[int] | None:
    """Independent statement of the abort rule: the survivor set, or None if the round must abort."""
    n, t = params.num_clients, params.threshold
    everyone = set(range(1, n + 1))
    active = [
        {u for u in everyone if drops.get(u) is None or STAGES.index(drops[u]) > i}
        for i in range(len(STAGES))
    ]
    u1, u2, u3, signers, responders = active

    def holders(u: int) -> set[int]:
        return set(graph.neighbors(u)) | {u}

    for a in (u1, u2):
        if len(a) < t or any(len(a & holders(u)) < t for u in a):
            return None
    if len(signers) < t:
        return None
    # A signer reveals shares only if t of its holders (itself included) signed the survivor set.
    vouched = {v for v in signers if len(signers & holders(v)) >= t}
    for a in (u3, vouched, responders & vouched):
        if len(a) < t:
            return None
        if any(len(a & holders(u)) < t for u in u3):
            return None
        for u in u2 - u3:
            if u3 & set(graph.neighbors(u)) and len(a & set(graph.neighbors(u))) < t:
                return None
    return u3


def honest_clients_done(rnd: Round, survivors: set[int]) -> bool:
    """Every client that answered the unmask request ended in DONE."""
    return all(rnd.clients[c].stage is Stage.FINISHED for c in survivors)
