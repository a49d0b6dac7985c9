"""``python -m aggregator``: the same as ``fedfer-aggregator``."""

from aggregator.cli import main

raise SystemExit(main())
