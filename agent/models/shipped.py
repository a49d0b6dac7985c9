"""The models the agent ships: files in the package (``fedfer/agent/release/``), each pinned by SHA-256.

A fresh install (or clone) has the trained IFER without training anything: :func:`shipped_ifer` returns its
manifest after checking both files against the digests pinned here, and refuses them with a
:class:`~fedfer.agent.errors.ModelFileError` naming the file when they do not match (a tampered or truncated
copy is never loaded). How each file is reproduced from the repository's own recipe is in
docs/learning.md ("Shipped models"): ``fedfer-agent train-ifer --recipe --classes 7``, then
``fedfer-agent release-ifer``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from fedfer.agent.errors import ModelFileError

__all__ = ["RELEASE_DIR", "SHIPPED_IFER", "ShippedModel", "shipped_ifer", "verify_shipped"]

#: The folder of shipped models inside the installed package.
RELEASE_DIR = Path(__file__).resolve().parents[1] / "release"


@dataclass(frozen=True, slots=True)
class ShippedModel:
    """A shipped export: its folder below :data:`RELEASE_DIR` and the pinned SHA-256 of both files."""

    folder: str
    manifest: str
    manifest_sha256: str
    weights: str
    weights_sha256: str


#: The 7-class IFER (f + g) every agent runs: the recipe's network without the FER2013-dev class-bias
#: calibration, FER2013's measured framing, two views (face and mirror), float16 weights.
SHIPPED_IFER = ShippedModel(
    folder="ifer",
    manifest="ifer.json",
    manifest_sha256="f6d760a59f36adcd09ec895e72dcae9ca21df33da804480f35295d7df5e0ba35",
    weights="ifer.npz",
    weights_sha256="a490b7e9fd2a69db17122874a99fe9450c13e41a908093f63fd614b666eb15e4",
)


def _check(path: Path, sha256: str) -> None:
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ModelFileError(f"shipped model file missing or unreadable: {path.name}") from exc
    if not hmac.compare_digest(digest, sha256):
        raise ModelFileError(f"shipped model file {path.name} does not match its pinned SHA-256; refused")


def verify_shipped(model: ShippedModel, *, root: Path = RELEASE_DIR) -> Path:
    """Check a shipped export's two files against their pins; returns the manifest's path.

    Raises:
        ModelFileError: a file is missing, unreadable or not the pinned file.
    """
    folder = Path(root) / model.folder
    _check(folder / model.manifest, model.manifest_sha256)
    _check(folder / model.weights, model.weights_sha256)
    return folder / model.manifest


def shipped_ifer(*, root: Path = RELEASE_DIR) -> Path:
    """The verified manifest of the shipped IFER (see :data:`SHIPPED_IFER`)."""
    return verify_shipped(SHIPPED_IFER, root=root)
