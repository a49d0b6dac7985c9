"""What makes a configuration run but not do its job, said at start-up and in ``status``.

An untrained IFER head is the main one: its pseudo labels are meaningless, so ``personalize`` and ``join``
refuse to run on it (:func:`require_trained_ifer`) unless ``learning.allow_untrained_ifer`` opts in.
"""

from __future__ import annotations

from fedfer.agent.config import AgentConfig
from fedfer.security.errors import ValidationError

__all__ = ["UNTRAINED_IFER", "ifer_untrained", "require_trained_ifer", "startup_warnings"]

_UNTRAINED = (
    "the IFER head g is untrained (vision.ifer_model and vision.ifer_head are empty), so its pseudo labels "
    "are meaningless"
)
#: Why ``personalize``/``join`` refuse to run on an untrained IFER head, and what to do about it.
UNTRAINED_IFER = (
    f"{_UNTRAINED}: install an IFER export (fedfer-agent provision --ifer EXPORT, see "
    "docs/deploy-systemd.md) and set vision.ifer_model, or set learning.allow_untrained_ifer = true for "
    "experiments"
)


def ifer_untrained(config: AgentConfig) -> bool:
    """Whether the vision stage's IFER head would keep its random initialization (no export, no head file)."""
    return not config.vision.ifer_model and not config.vision.ifer_head


def startup_warnings(config: AgentConfig) -> list[str]:
    """What makes this configuration run but not do its job: an untrained IFER head, missing model files."""
    warnings = []
    if ifer_untrained(config):
        refused = "" if config.learning.allow_untrained_ifer else "; personalize and join are refused"
        warnings.append(_UNTRAINED + refused)
    vision = config.vision
    for key in ("detector_model", "ifer_model", "feature_weights", "ifer_head"):
        value = getattr(vision, key)
        if value and not config.model_path(value).exists():
            warnings.append(f"vision.{key} not found at {config.model_path(value)} (check FEDFER_ASSETS)")
    return warnings


def require_trained_ifer(config: AgentConfig) -> None:
    """Refuse learning from pseudo labels of an untrained IFER head (unless the config opts in).

    Raises:
        ValidationError: the head is untrained and ``learning.allow_untrained_ifer`` is off.
    """
    if ifer_untrained(config) and not config.learning.allow_untrained_ifer:
        raise ValidationError(UNTRAINED_IFER)
