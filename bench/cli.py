"""``fedfer-bench``: run one benchmark and print its result as a single JSON object on stdout.

Each benchmark lives in its own module ``fedfer.bench.<name>`` exposing ``add_arguments(parser)`` and
``run(args) -> dict``; it is imported only when chosen, so a cheap benchmark never pays for torch (and the
``secagg`` and ``storage`` benchmarks run on the base install, without the agent's extras).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["BENCHMARKS", "main"]


class Benchmark(Protocol):
    """What a benchmark module provides."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Register the benchmark's options."""
        ...

    def run(self, args: argparse.Namespace) -> dict[str, Any]:
        """Run it; the JSON-able result (``"ok": false`` makes the exit status non-zero)."""
        ...


#: name -> one-line help, in the order ``--help`` lists them.
BENCHMARKS: dict[str, str] = {
    "secagg": "one in-process secure-aggregation round",
    "federation": "one secure-aggregation round over real gRPC",
    "edge": "the on-device vision pipeline on a video",
    "learning": "IFER vs the published peer on FER2013, and simulated personalization",
    "personalization": "IFER, personalization and secure FedAvg on real performers",
    "cache": "encrypted feature cache throughput and footprint",
    "storage": "latency of the aggregator's storage operations",
    "daemon": "the agent as a service: start-up, control latency, throughput, drain",
}


def _load(name: str) -> Benchmark:
    """The benchmark module ``name`` (imported here, only when chosen)."""
    module: Benchmark
    if name == "secagg":
        from fedfer.bench import secagg as module
    elif name == "federation":
        from fedfer.bench import federation as module
    elif name == "edge":
        from fedfer.bench import edge as module
    elif name == "learning":
        from fedfer.bench import learning as module
    elif name == "personalization":
        from fedfer.bench import personalization as module
    elif name == "cache":
        from fedfer.bench import cache as module
    elif name == "storage":
        from fedfer.bench import storage as module
    elif name == "daemon":
        from fedfer.bench import daemon as module
    else:
        raise KeyError(name)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the chosen benchmark and print its JSON; non-zero exit on failure."""
    parser = argparse.ArgumentParser(prog="fedfer-bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    chosen = None
    args_list = list(sys.argv[1:] if argv is None else argv)
    for name, help_text in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text)
        if args_list and args_list[0] == name:
            chosen = _load(name)
            chosen.add_arguments(p)
    args = parser.parse_args(args_list)
    if chosen is None:  # argparse has already rejected unknown names; this guards the invariant
        parser.error("no benchmark chosen")
    result = chosen.run(args)
    print(json.dumps(result, sort_keys=True))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
