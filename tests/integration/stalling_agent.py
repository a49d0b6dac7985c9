"""Test only: ``fedfer-agent`` whose device hangs right after one stage's message was accepted.

A device that vanished mid-round, at a precise point:
``python -m tests.integration.stalling_agent --stall-after STAGE [--stall-round N] join-round ...`` runs the
real ``fedfer-agent`` command line, with the federation client's per-stage hook
(:class:`fedfer.agent.federation.client.FederationClient` ``hooks``) set to print ``{"stalled": STAGE}`` and
wait forever the N-th time that stage's message is accepted. The test then kills the process. Nothing of this
ships in the product.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from fedfer.agent import cli
from fedfer.agent.federation import client as federation_client

STAGES = ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask")


def install(stage: str, occurrence: int) -> None:
    """Make every :class:`FederationClient` the agent creates stall at the ``occurrence``-th ``stage``."""
    base = federation_client.FederationClient
    seen = {"count": 0}

    async def stall() -> None:
        seen["count"] += 1
        if seen["count"] == occurrence:
            print(json.dumps({"stalled": stage}), flush=True)
            await asyncio.Event().wait()  # hang: the test kills this process with SIGKILL

    class StallingClient(base):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs, hooks={stage: stall})

    federation_client.FederationClient = StallingClient  # type: ignore[misc]


def main(argv: Sequence[str]) -> int:
    """Parse the stall options, install the hook, run the rest of the command line as ``fedfer-agent``."""
    parser = argparse.ArgumentParser(prog="stalling_agent", allow_abbrev=False)
    parser.add_argument("--stall-after", choices=STAGES, required=True)
    parser.add_argument("--stall-round", type=int, default=1, help="stall the N-th time the stage is reached")
    known, rest = parser.parse_known_args(argv)
    install(known.stall_after, known.stall_round)
    return cli.main(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
