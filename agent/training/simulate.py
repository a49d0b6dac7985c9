"""Simulated subjects for personalization experiments — a SIMULATION, labelled as such in every report.

Real multi-subject video is not available here, so each simulated subject is a consistent, realistic
appearance shift applied to real FER2013 face images: a lighting change (gamma and gain), a colour cast, blur,
a head-pose rotation and scale, and optionally an occluding bar (glasses/hand-like). A "clip" is a few frames
made from ONE face image by small temporal jitter (sub-pixel shift, tiny rotation, brightness flicker, sensor
noise). Each subject's source images are split into a disjoint unlabelled adaptation half and a test half.

Randomness here shapes synthetic data only (nothing secret), so numpy's seeded generator is appropriate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedfer.agent.errors import DatasetError

__all__ = ["SubjectStyle", "make_styles", "render_clip", "render_clips"]


@dataclass(frozen=True, slots=True)
class SubjectStyle:
    """One simulated subject's consistent appearance shift.

    Attributes:
        name: subject id (``sim-00`` ...).
        gamma: lighting gamma (>1 darker mid-tones).
        gain: overall brightness gain.
        cast: RGB channel gains (colour cast of the camera/lighting).
        blur: Gaussian blur sigma in pixels of a 48x48 face (0 = none).
        rotation: head roll in degrees.
        scale: zoom factor of the face in the frame.
        occlusion: ``(top, height)`` of a dark horizontal bar as fractions of the face, or ``None``.
    """

    name: str
    gamma: float
    gain: float
    cast: tuple[float, float, float]
    blur: float
    rotation: float
    scale: float
    occlusion: tuple[float, float] | None


def make_styles(count: int, *, seed: int = 0) -> list[SubjectStyle]:
    """``count`` distinct subject styles drawn from plausible ranges (deterministic for ``seed``)."""
    if type(count) is not int or count < 1:
        raise DatasetError("count must be a positive int")
    rng = np.random.default_rng(seed)
    styles = []
    for i in range(count):
        occ = None
        if rng.random() < 0.35:
            occ = (float(rng.choice([0.28, 0.62])), float(rng.uniform(0.10, 0.16)))
        styles.append(
            SubjectStyle(
                name=f"sim-{i:02d}",
                gamma=float(rng.uniform(0.6, 1.7)),
                gain=float(rng.uniform(0.7, 1.25)),
                cast=(
                    float(rng.uniform(0.75, 1.2)),
                    float(rng.uniform(0.85, 1.1)),
                    float(rng.uniform(0.7, 1.25)),
                ),
                blur=float(rng.choice([0.0, rng.uniform(0.6, 1.4)])),
                rotation=float(rng.uniform(-14, 14)),
                scale=float(rng.uniform(0.9, 1.12)),
                occlusion=occ,
            )
        )
    return styles


def _apply(gray: np.ndarray, style: SubjectStyle | None, jitter: np.ndarray) -> np.ndarray:
    import cv2

    h, w = gray.shape
    dx, dy, drot, flicker, noise_seed = jitter
    rot = (style.rotation if style else 0.0) + drot
    scale = style.scale if style else 1.0
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), rot, scale)
    m[:, 2] += (dx, dy)
    img = cv2.warpAffine(gray, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    x: np.ndarray = img.astype(np.float32) / 255.0
    if style is not None:
        if style.blur > 0:
            x = np.asarray(cv2.GaussianBlur(x, (0, 0), style.blur), dtype=np.float32)
        x = np.asarray(np.clip(x, 0, 1) ** style.gamma * style.gain, dtype=np.float32)
        if style.occlusion is not None:
            top, height = style.occlusion
            x[int(top * h) : int((top + height) * h), :] *= 0.15
    x = x * (1.0 + flicker)
    rgb = np.repeat(x[..., None], 3, axis=2)
    if style is not None:
        rgb = rgb * np.asarray(style.cast, dtype=np.float32)
    rng = np.random.default_rng(int(noise_seed))
    rgb = rgb + rng.normal(0.0, 0.012, rgb.shape).astype(np.float32)
    return np.asarray(np.clip(rgb * 255.0 + 0.5, 0, 255), dtype=np.uint8)


def render_clip(
    gray: np.ndarray, style: SubjectStyle | None, *, frames: int, rng: np.random.Generator
) -> np.ndarray:
    """A short clip ``(frames, H, W, 3)`` uint8 RGB of one face under ``style`` with temporal jitter."""
    if np.asarray(gray).ndim != 2 or np.asarray(gray).dtype != np.uint8:
        raise DatasetError("source face must be a uint8 grayscale image")
    if type(frames) is not int or frames < 1:
        raise DatasetError("frames must be a positive int")
    out = []
    # A smooth random walk: consecutive frames differ a little, like a head that is almost still.
    pos = np.zeros(3)
    for _ in range(frames):
        pos = 0.6 * pos + rng.normal(0.0, [0.7, 0.7, 1.0])
        jitter = np.array([pos[0], pos[1], pos[2], rng.normal(0.0, 0.03), rng.integers(0, 2**31)])
        out.append(_apply(gray, style, jitter))
    return np.stack(out)


def render_clips(
    grays: Sequence[np.ndarray], style: SubjectStyle | None, *, frames: int, seed: int
) -> np.ndarray:
    """Clips for many source faces: ``(N, frames, H, W, 3)`` uint8 RGB (deterministic for ``seed``)."""
    rng = np.random.default_rng(seed)
    if not len(grays):
        raise DatasetError("no source faces")
    return np.stack([render_clip(g, style, frames=frames, rng=rng) for g in grays])
