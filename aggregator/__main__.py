"""``python -m fedfer.aggregator``: the same as ``fedfer-aggregator``."""

from fedfer.aggregator.cli import main

raise SystemExit(main())
