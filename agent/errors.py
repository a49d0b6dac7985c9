"""Errors that several of the agent's packages raise (all :class:`fedfer.security.errors.FedferError`).

An error that only one module raises lives in that module (``CaptureError``, ``CacheError``, ...); these
cross package lines: the daemon reports a component it cannot bind, the models, training and learning code
share the dataset, model-file and privacy-budget errors.
"""

from __future__ import annotations

from fedfer.security.errors import FedferError, ValidationError

__all__ = ["ComponentUnavailableError", "DatasetError", "ModelFileError", "PrivacyBudgetExceededError"]


class ComponentUnavailableError(FedferError):
    """A component the daemon binds (vision models, cache key store, federation state) is not usable."""


class DatasetError(ValidationError):
    """A dataset folder or table is missing, malformed or does not hold what was asked for."""


class ModelFileError(ValidationError):
    """A model file or exported model is missing, corrupt or does not match the expected layout."""


class PrivacyBudgetExceededError(FedferError):
    """The device's DP budget is spent (or would be by this run): no further private training."""
