"""Frames to face records: nothing but features and class probabilities leaves this package.

* :mod:`~fedfer.agent.vision.faces`: MediaPipe face detection (pinned model) and square face crops;
* :mod:`~fedfer.agent.vision.sessions`: where one session ends and the next begins;
* :mod:`~fedfer.agent.vision.pipeline`: faces → ``f`` → ``g`` per frame, batched, into sessions; the daemon's
  vision stage.
"""

__all__: list[str] = []
