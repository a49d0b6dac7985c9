"""The fedfer device agent (``fedfer-agent``): from camera frames to masked model updates.

Packages, each building only on those listed before it (the rule is in docs/architecture.md and
tests/test_layout.py checks it):

* :mod:`~fedfer.agent.errors`, :mod:`~fedfer.agent.files`, :mod:`~fedfer.agent.records`,
  :mod:`~fedfer.agent.config`: shared errors, file helpers, what vision yields per frame (and the constants it
  fixes: feature size, class sets), the configuration schema;
* :mod:`fedfer.agent.models`: the networks (MobileNetV2 ``f``, IFER ``g``, the video model ``v``), their
  pinned weight files and the exported model files;
* :mod:`fedfer.agent.capture`: video sources sampled to frames, the processed-files ledger;
* :mod:`fedfer.agent.vision`: faces, session cutting, the vision pipeline (frame → record);
* :mod:`fedfer.agent.store`: the encrypted feature cache, its key stores, the learner's record sink;
* :mod:`fedfer.agent.learning`: on-device learning: personalization of ``v``, DP-SGD, round updates, the
  privacy ledger;
* :mod:`fedfer.agent.federation`: enrollment and secure-aggregation rounds over gRPC;
* :mod:`fedfer.agent.training`: central (offline) training and evaluation of ``g`` and ``v``, datasets;
* :mod:`fedfer.agent.daemon`: the supervisor, its worker processes and their messages, jobs, control plane;
* :mod:`fedfer.agent.cli`: the ``fedfer-agent`` command line.

The agent needs the ``agent`` extras (torch, Opacus, MediaPipe, OpenCV, ZeroMQ, ...). They are checked here,
once, for every module of the agent: without them, importing any of it raises :class:`ImportError` saying
what is missing and how to install it. The aggregator's base install never imports the agent.
"""

from importlib.util import find_spec

__all__: list[str] = []

# import name -> distribution in the `agent` extra (pyproject.toml)
_EXTRAS = {
    "cv2": "opencv-contrib-python",
    "h5py": "h5py",
    "matplotlib": "matplotlib",
    "mediapipe": "mediapipe",
    "opacus": "opacus",
    "torch": "torch",
    "zmq": "pyzmq",
}
_missing = sorted(dist for module, dist in _EXTRAS.items() if find_spec(module) is None)
if _missing:
    raise ImportError(
        "the fedfer agent needs the 'agent' extras, which are not installed "
        f"(missing: {', '.join(_missing)}); install them with: pip install 'fedfer[agent]'"
    )
