"""``python -m fedfer.agent.cli``: the same as ``fedfer-agent``."""

from fedfer.agent.cli import main

raise SystemExit(main())
