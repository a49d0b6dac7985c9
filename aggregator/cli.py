"""``fedfer-aggregator``: create a deployment (``init``) and run the service (``serve``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run one aggregator command."""
    parser = argparse.ArgumentParser(prog="fedfer-aggregator")
    parser.add_subparsers(dest="command", required=True)
    parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
