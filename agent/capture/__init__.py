"""Video in: OpenCV sources sampled to frames that exist only in RAM.

* :mod:`~fedfer.agent.capture.video`: :class:`~fedfer.agent.capture.video.VideoSource` (a camera index, a file
  or a stream URL) and the :class:`~fedfer.agent.capture.video.Frame` it yields;
* :mod:`~fedfer.agent.capture.sources`: the daemon's ``[capture]`` source, segment by segment;
* :mod:`~fedfer.agent.capture.ledger`: which files of a finite file source are stored already.
"""

__all__: list[str] = []
