"""The fedfer cloud aggregator: gRPC service, round orchestration, storage, model registry and enrollment.

It handles the video model ``v`` as named arrays and never imports torch or the agent package.
"""

__all__: list[str] = []
