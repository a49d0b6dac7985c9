"""Per-epoch training checkpoints, so an interrupted central training run resumes instead of starting over.

A checkpoint is one file written atomically after every epoch (:func:`fedfer.security.files.write_atomic`: a
run killed while writing leaves the previous checkpoint). It holds what the next epoch needs to continue
exactly where the run stopped: the model, optimizer and schedule state, the best epoch's weights, the history,
and the torch and NumPy random states. It is read with ``torch.load(weights_only=True)`` (no code runs from
the file) and carries the key of the run it belongs to; a checkpoint of another run, or one that cannot be
read, is ignored with a warning and the training starts from the beginning (it never fails a run).
"""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedfer.security.files import write_atomic

__all__ = ["Checkpoint"]

LOG = logging.getLogger(__name__)
_FORMAT = "fedfer-train-checkpoint/1"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a training run keeps its checkpoint, and the key naming that run.

    Attributes:
        path: the checkpoint file.
        key: identifies the run (e.g. the recipe's cache key); a checkpoint with another key is ignored.
    """

    path: Path
    key: str

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, or None when there is none (or it is unreadable or another run's)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            LOG.warning("ignoring unreadable training checkpoint %s (%s); starting over", self.path, exc)
            return None
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            LOG.warning("ignoring %s: not a training checkpoint; starting over", self.path)
            return None
        if state.get("key") != self.key:
            LOG.warning("ignoring %s: it belongs to another training run; starting over", self.path)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors, numbers, strings, lists and dicts of them) atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({**state, "format": _FORMAT, "key": self.key}, buffer)
        write_atomic(self.path, buffer.getvalue())

    def remove(self) -> None:
        """Delete the checkpoint (once the finished model is saved)."""
        self.path.unlink(missing_ok=True)
