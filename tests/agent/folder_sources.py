"""Folders for the folder-source tests: real clips and photos from ../shared (linked or copied), bad files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedfer.agent.config import AgentConfig
from fedfer.agent.vision.faces import FaceDetector

CLIP = "1001_DFA_HAP_XX.flv"
NOT_A_VIDEO = "0000_not_a_video.mp4"


def camera_folder(tmp_path: Path, assets: Path) -> Path:
    """``tmp_path/camera``: random bytes named ``0000_not_a_video.mp4``, then a real CREMA-D clip."""
    folder = tmp_path / "camera"
    folder.mkdir()
    (folder / NOT_A_VIDEO).write_bytes(os.urandom(300_000))
    shutil.copy(assets / "data" / "crema-d-sample" / CLIP, folder / CLIP)
    return folder


def link_photos(assets: Path, folder: Path, names: tuple[str, ...]) -> Path:
    """``folder`` (created) with links to the real Taiwanese photos ``names`` (``PPTVeSS``, no suffix)."""
    folder.mkdir()
    photos = assets / "data" / "taiwanese-emotions" / "faces_256x256"
    for name in names:
        (folder / f"{name}.jpg").symlink_to(photos / f"{name}.jpg")
    return folder


def config_detector(config: AgentConfig) -> FaceDetector:
    """The face detector with the daemon's settings (real MediaPipe): what vision finds in a frame."""
    vision = config.vision
    return FaceDetector(
        model_path=config.model_path(vision.detector_model),
        sha256=vision.detector_sha256,
        min_confidence=vision.min_score,
        margin=vision.margin,
    )
