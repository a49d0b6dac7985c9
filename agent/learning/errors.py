"""Errors of the learning area (all :class:`security.errors.FedferError` subclasses)."""

from __future__ import annotations

from fedfer.security.errors import FedferError, ValidationError

__all__ = ["DatasetError", "ModelFileError", "PrivacyBudgetExceededError"]


class DatasetError(ValidationError):
    """A dataset folder or table is missing, malformed or does not hold what was asked for."""


class ModelFileError(ValidationError):
    """A model file or exported model is missing, corrupt or does not match the expected layout."""


class PrivacyBudgetExceededError(FedferError):
    """The device's DP budget is spent (or would be by this run): no further private training."""
