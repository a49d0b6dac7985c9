"""Model files for an installed agent: copied from a folder the operator gives, verified, into its assets.

The install scripts (``deploy/systemd/install.sh``, ``deploy/launchd/install.sh``) run
``fedfer-agent provision --from DIR --to ASSETS --ifer EXPORT`` so that a freshly installed service finds
every model its vision worker loads (``FEDFER_ASSETS`` points at ``ASSETS``). Nothing is trusted for its
name or origin:

* the MediaPipe face detector must match the SHA-256 pinned in :mod:`fedfer.agent.models.weights`;
* the TFLite MobileNetV2 (f, used only without an IFER export) must match :data:`MOBILENET_TFLITE_SHA256`,
  the digest of the file in the asset folder (``../shared``);
* an IFER export (f + g, written by ``fedfer-agent train-ifer``) must carry the digest of its weights in its
  manifest and load as an IFER model.

Each file is read and verified, then written atomically (:func:`fedfer.security.files.write_atomic`), so a
failed or interrupted provisioning never leaves a partial file under a final name; the IFER export's folder
is verified where it is staged and swapped in as a whole.
The layout below ``ASSETS`` is the one the default configuration names (``models/mediapipe/...``), and the
IFER export goes to ``models/ifer/`` (``vision.ifer_model = "models/ifer"``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfer.agent.errors import ModelFileError
from fedfer.agent.files import DETECTOR_MODEL
from fedfer.agent.files import MOBILENET_TFLITE as MOBILENET_TFLITE_FILE
from fedfer.agent.models.export import load_exported
from fedfer.agent.models.ifer import load_ifer
from fedfer.agent.models.weights import MEDIAPIPE_FACE_DETECTOR, WeightsError, pinned_sha256, verify_sha256
from fedfer.security.errors import FedferError
from fedfer.security.files import write_atomic

__all__ = [
    "DETECTOR",
    "IFER_DIR",
    "MOBILENET_TFLITE",
    "MOBILENET_TFLITE_SHA256",
    "ModelFile",
    "ProvisionError",
    "check_assets",
    "provision",
]

#: SHA-256 of ``mobilenet_v2_1.0_224_quant.tflite`` (Coral test data), the file in the asset folder.
MOBILENET_TFLITE_SHA256 = "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776"
#: Where the IFER export goes below the assets folder (the value of ``vision.ifer_model`` the installers set).
IFER_DIR = "models/ifer"


class ProvisionError(FedferError):
    """A model file is missing, refused (digest, format) or cannot be installed."""


@dataclass(frozen=True, slots=True)
class ModelFile:
    """One pinned model file: its path below an assets folder and its SHA-256."""

    relative: str
    sha256: str


DETECTOR = ModelFile(DETECTOR_MODEL, MEDIAPIPE_FACE_DETECTOR.sha256)
MOBILENET_TFLITE = ModelFile(MOBILENET_TFLITE_FILE, MOBILENET_TFLITE_SHA256)


def _copy_verified(source: Path, dest: Path, sha256: str | None) -> None:
    """Copy ``source`` to ``dest`` (written atomically, 0644), checking ``sha256`` (when given) first."""
    if not source.is_file():
        raise ProvisionError(f"model file not found: {source}")
    try:
        data = source.read_bytes()
        if sha256 is not None and not hmac.compare_digest(
            hashlib.sha256(data).hexdigest(), pinned_sha256(sha256)
        ):
            raise WeightsError(f"SHA-256 of {source.name} does not match the pinned digest; file refused")
        dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(dest, data, mode=0o644)  # model files hold no secret; the service user must read them
    except WeightsError as exc:
        raise ProvisionError(f"{source}: {exc}") from None
    except OSError as exc:
        raise ProvisionError(f"cannot install {dest} ({exc.strerror})") from None


def _check_ifer(manifest: Path, *, build: bool = True) -> dict[str, Any]:
    """Read ``manifest`` as an IFER export (weights' digest; with ``build`` the model too); its metadata."""
    try:
        _, meta = load_exported(manifest)
        if meta.get("kind") != "ifer":
            raise ProvisionError(f"{manifest} is not an IFER export (kind {meta.get('kind')!r})")
        if build:
            load_ifer(manifest)
    except ModelFileError as exc:
        raise ProvisionError(f"{manifest}: {exc}") from None
    return meta


def _install_ifer(export: Path, assets: Path) -> dict[str, Any]:
    """Verify the IFER export at ``export`` (manifest or its folder); install it as ``assets/models/ifer``."""
    manifest = export
    if export.is_dir():
        found = sorted(export.glob("*.json"))
        if len(found) != 1:
            raise ProvisionError(f"{export} must hold exactly one IFER manifest (.json)")
        manifest = found[0]
    if not manifest.is_file():
        raise ProvisionError(f"IFER export not found: {export}")
    meta = _check_ifer(manifest, build=False)  # the installed copy is built below
    weights = manifest.parent / Path(str(meta["weights"])).name
    target = assets / IFER_DIR
    staging = assets / "models" / ".ifer.new"
    shutil.rmtree(staging, ignore_errors=True)
    _copy_verified(weights, staging / weights.name, str(meta["sha256"]))
    _copy_verified(manifest, staging / manifest.name, None)
    _check_ifer(staging / manifest.name)
    os.chmod(staging, 0o755)  # noqa: S103 - a folder of public model files the service user must read
    # Swap the folder as a whole: the daemon loads "the one manifest in models/ifer".
    old = assets / "models" / ".ifer.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return {"path": str(target), "classes": list(meta.get("classes", [])), "sha256": meta["sha256"]}


def provision(
    *, source: Path, assets: Path, ifer: Path | None, require_tflite: bool = False
) -> dict[str, Any]:
    """Install verified model files from ``source`` (laid out like ``../shared``) into ``assets``.

    Args:
        source: folder holding ``models/mediapipe/...`` (and ``models/mobilenet_v2_tflite/...``).
        assets: the service's assets folder (``FEDFER_ASSETS``); created if missing.
        ifer: an IFER export to install as ``models/ifer`` (``None``: the service has no trained IFER head).
        require_tflite: also require the TFLite MobileNetV2 (without an IFER export it is f).

    Returns:
        What was installed: ``{"assets", "files": [...], "ifer": {...} | None}``.

    Raises:
        ProvisionError: a file is missing, fails its digest or format check, or cannot be written.
    """
    assets.mkdir(mode=0o755, parents=True, exist_ok=True)
    installed = []
    for model in (DETECTOR, MOBILENET_TFLITE):
        src = source / model.relative
        if model is MOBILENET_TFLITE and not src.is_file() and not require_tflite:
            continue
        _copy_verified(src, assets / model.relative, model.sha256)
        installed.append(model.relative)
    return {
        "assets": str(assets),
        "files": installed,
        "ifer": _install_ifer(ifer, assets) if ifer is not None else None,
    }


def check_assets(assets: Path) -> dict[str, Any]:
    """Verify what :func:`provision` installed in ``assets`` (for an upgrade that brings no new files).

    Raises:
        ProvisionError: the detector is missing or refused, or the installed IFER export is refused.
    """
    try:
        verify_sha256(assets / DETECTOR.relative, DETECTOR.sha256)
    except WeightsError as exc:
        raise ProvisionError(f"{assets / DETECTOR.relative}: {exc}") from None
    ifer = assets / IFER_DIR
    meta = _check_ifer(ifer) if ifer.exists() else None
    return {
        "assets": str(assets),
        "files": [DETECTOR.relative],
        "ifer": None if meta is None else {"path": str(ifer), "classes": list(meta.get("classes", []))},
    }
