"""``fedfer-bench``: run one benchmark and print its result as a single JSON object on stdout.

Each benchmark lives in its own module ``bench/<name>.py`` exposing ``add_arguments(parser)`` and
``run(args) -> dict``; it is imported only when chosen, so a cheap benchmark never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "secagg": ("fedfer.bench.secagg", "one in-process secure-aggregation round"),
    "federation": ("fedfer.bench.federation", "one secure-aggregation round over real gRPC"),
    "edge": ("fedfer.bench.edge", "the on-device vision pipeline on a video"),
    "learning": ("fedfer.bench.learning", "IFER vs the published peer, and personalization"),
    "cache": ("fedfer.bench.cache", "encrypted feature cache throughput and footprint"),
    "storage": ("fedfer.bench.storage", "latency of the aggregator's storage operations"),
    "daemon": ("fedfer.bench.daemon", "the agent as a service: start-up, control latency, throughput, drain"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the chosen benchmark and print its JSON; non-zero exit on failure."""
    parser = argparse.ArgumentParser(prog="fedfer-bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    chosen = None
    args_list = list(sys.argv[1:] if argv is None else argv)
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text)
        if args_list and args_list[0] == name:
            chosen = importlib.import_module(module_name)
            chosen.add_arguments(p)
    args = parser.parse_args(args_list)
    if chosen is None:  # argparse has already rejected unknown names; this guards the invariant
        parser.error("no benchmark chosen")
    result = chosen.run(args)
    print(json.dumps(result, sort_keys=True))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
