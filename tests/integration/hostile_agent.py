"""Test only: the real ``fedfer-agent`` command line with one device turned hostile, slow or paused.

``python -m tests.integration.hostile_agent MODE... join-round ...`` patches the protocol client or the
federation client of this one process, then runs the rest of the command line as ``fedfer-agent``:

* ``--shift-masked K``: follows the protocol, then adds ``K * clip * scale`` to every update coordinate of its
  masked vector (a device pushing the model far outside its clip bound);
* ``--lie-at-unmask``: at unmasking, alters the first key it reveals (the one opening a victim's seed share),
  as a holder substituting a crafted share would;
* ``--answer-late S``: sends each stage message S seconds before that stage's deadline;
* ``--resend N``: sends each accepted stage message N more times under fresh request ids;
* ``--pause-after STAGE --resume-file PATH``: after that stage's message was accepted prints
  ``{"paused": STAGE}`` and waits until PATH exists.

Nothing of this ships in the product.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedfer.agent import cli
from fedfer.agent.federation import client as federation_client
from fedfer.security.errors import FedferError
from fedfer.security.secagg import client as secagg_client
from fedfer.security.secagg.messages import MaskedInput
from fedfer.security.secagg.stage import Stage

STAGES = ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask")


def shift_masked(k: float) -> None:
    """Add ``k * clip * scale`` to every update coordinate of the masked vector, after masking."""
    original = secagg_client.SecAggClient.masked_input

    def masked_input(self: Any, broadcast: Any, *, update: Any, weight: int) -> MaskedInput:
        msg = original(self, broadcast, update=update, weight=weight)
        params = self._params
        push = np.uint64(round(k * params.clip * params.codec().scale)) % np.uint64(1 << params.modulus_bits)
        vector = msg.vector.astype(np.uint64)
        vector[:-1] = (vector[:-1] + push) % np.uint64(1 << params.modulus_bits)
        return MaskedInput(msg.round_id, msg.sender, msg.modulus_bits, vector.astype(msg.vector.dtype))

    secagg_client.SecAggClient.masked_input = masked_input  # type: ignore[method-assign]


def lie_at_unmask() -> None:
    """Flip one bit of the first key revealed for a victim's seed share."""
    original = secagg_client.SecAggClient.unmask

    def unmask(self: Any, request: Any) -> Any:
        resp = original(self, request)
        first = resp.seed_keys[0]
        crafted = dataclasses.replace(first, key=bytes([first.key[0] ^ 0x01]) + first.key[1:])
        print(json.dumps({"lied_about": first.owner}), flush=True)
        return dataclasses.replace(resp, seed_keys=(crafted, *resp.seed_keys[1:]))

    secagg_client.SecAggClient.unmask = unmask  # type: ignore[method-assign]


def answer_late(seconds: float, resend: int) -> None:
    """Hold each stage message until ``seconds`` before its deadline; send it ``resend`` more times."""
    base = federation_client.FederationClient
    send, upload = base._send, base._upload

    async def hold(self: Any, stage: Any) -> None:
        deadline_ms = self.stage_deadlines.get(stage)
        if seconds and deadline_ms:
            await asyncio.sleep(max(0.0, deadline_ms / 1000 - seconds - time.time()))

    async def again(what: str, resent: Any) -> None:
        accepted = 0
        for _ in range(resend):
            try:
                await resent()
            except (FedferError, grpc.aio.AioRpcError):  # the stage closed meanwhile: stop resending
                break
            accepted += 1
        if resend:
            print(json.dumps({"resent": what, "accepted": accepted}), flush=True)

    async def late_send(self: Any, what: str, method: Any, round_id: int, payload: bytes, stage: Any) -> None:
        await hold(self, stage)
        await send(self, what, method, round_id, payload, stage)
        await again(what, lambda: send(self, what, method, round_id, payload, stage))

    async def late_upload(self: Any, round_id: int, payload: bytes) -> None:
        await hold(self, Stage.MASKED_INPUT)
        await upload(self, round_id, payload)
        await again("masked input", lambda: upload(self, round_id, payload))

    base._send = late_send  # type: ignore[method-assign]
    base._upload = late_upload  # type: ignore[method-assign]


def pause_after(stage: str, resume_file: Path) -> None:
    """Pause every client the agent creates after ``stage`` until ``resume_file`` exists."""
    base = federation_client.FederationClient

    async def pause() -> None:
        print(json.dumps({"paused": stage}), flush=True)
        while not resume_file.exists():
            await asyncio.sleep(0.05)

    class PausingClient(base):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs, hooks={stage: pause})

    federation_client.FederationClient = PausingClient  # type: ignore[misc]


def main(argv: Sequence[str]) -> int:
    """Parse the modes, install them, run the rest of the command line as ``fedfer-agent``."""
    parser = argparse.ArgumentParser(prog="hostile_agent", allow_abbrev=False)
    parser.add_argument("--shift-masked", type=float, default=None)
    parser.add_argument("--lie-at-unmask", action="store_true")
    parser.add_argument("--answer-late", type=float, default=0.0)
    parser.add_argument("--resend", type=int, default=0)
    parser.add_argument("--pause-after", choices=STAGES, default=None)
    parser.add_argument("--resume-file", type=Path, default=None)
    known, rest = parser.parse_known_args(argv)
    if known.shift_masked is not None:
        shift_masked(known.shift_masked)
    if known.lie_at_unmask:
        lie_at_unmask()
    if known.answer_late or known.resend:
        answer_late(known.answer_late, known.resend)
    if known.pause_after is not None:
        pause_after(known.pause_after, known.resume_file)
    return cli.main(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
