"""``fedfer-agent``: the device agent's command line.

Commands are grouped in small modules (``fedfer.agent.cli.<area>``: ``vision``, ``training``,
``federation``, ``daemon``), each exposing ``register(subparsers)`` that adds its sub-commands with
``set_defaults(handler=...)``. Registration is cheap: heavy imports (torch, mediapipe) happen inside the
handlers, so ``fedfer-agent status`` starts fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fedfer.agent.cli import daemon, federation, training, vision
from fedfer.security.errors import FedferError

__all__ = ["build_parser", "main"]

#: The command groups, in the order ``--help`` lists them.
COMMAND_GROUPS = (vision, training, federation, daemon)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every command group registered."""
    parser = argparse.ArgumentParser(prog="fedfer-agent", description="fedfer device agent")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one agent command; errors of fedfer's own become a one-line message and exit status 2."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except FedferError as exc:
        print(f"fedfer-agent: error: {exc}", file=sys.stderr)
        return 2
