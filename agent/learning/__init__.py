"""Learning on top of ``f``: IFER ``g`` and VFER ``v`` training, unsupervised personalization, DP-SGD,
the published peer (mini-Xception) and evaluation in the paper's table format.

Modules: ``data`` (ImageFolder and CREMA-D readers, splits), ``features`` (content-hash cache), ``ifer``,
``vfer``, ``personalize``, ``dp`` (Opacus wrapper and per-device budget), ``peer``, ``simulate`` (simulated
subjects), ``clips`` and ``crema`` (the clip path), ``metrics``, ``export`` (named arrays + manifest).
Import the submodules directly; this package only re-exports the error types (importing torch is deferred).
"""

from fedfer.agent.learning.errors import DatasetError, ModelFileError, PrivacyBudgetExceededError

__all__ = ["DatasetError", "ModelFileError", "PrivacyBudgetExceededError"]
