"""Video in: OpenCV sources (cameras, streams, video files, still images) sampled to frames that exist only
in RAM.

* :mod:`~fedfer.agent.capture.video`: :class:`~fedfer.agent.capture.video.VideoSource` (a camera index, a file
  or a stream URL) and the :class:`~fedfer.agent.capture.video.Frame` it yields;
* :mod:`~fedfer.agent.capture.images`: still images as frames, and the runs of them that make sessions;
* :mod:`~fedfer.agent.capture.sources`: the daemon's ``[capture]`` source, segment by segment;
* :mod:`~fedfer.agent.capture.ledger`: which files of a file source are stored already, and which cannot be
  read.
"""

__all__: list[str] = []
