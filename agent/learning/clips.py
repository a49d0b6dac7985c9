"""Video clip → per-frame face crops → f features and IFER probabilities (the full clip path).

Frames are decoded with OpenCV, sampled to ``fps``, faces found with MediaPipe's Tasks ``FaceDetector``
(model file by path, SHA-256 pinned), the largest face is cropped with a margin, converted to grayscale (the
IFER model was trained on grayscale faces; the three channels are replicated) and run through
:class:`~agent.learning.ifer.FaceNet`. Frames without a face are skipped. Nothing is written to disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import TracebackType

import numpy as np

from agent.learning.errors import DatasetError, ModelFileError
from agent.learning.ifer import FaceNet

__all__ = ["DETECTOR_SHA256", "ClipFaces", "clip_features"]

DETECTOR_SHA256 = "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"


class ClipFaces:
    """Face crops from video files (context manager owning a MediaPipe detector).

    Args:
        detector_path: ``face_detection_short_range.tflite``.
        fps: sampling rate of frames (the source rate when higher).
        margin: extra border around the detected box, as a fraction of its size.
        min_score: detector confidence threshold.
        max_frames: stop after this many face crops per clip.
    """

    def __init__(
        self,
        *,
        detector_path: Path,
        fps: float = 10.0,
        margin: float = 0.15,
        min_score: float = 0.5,
        max_frames: int = 64,
    ) -> None:
        path = Path(detector_path)
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != DETECTOR_SHA256:
            raise ModelFileError("face detector model missing or not the pinned file")
        if not 0 < fps <= 120 or not 0 <= margin <= 1 or not 0 < min_score < 1 or max_frames < 1:
            raise DatasetError("fps, margin, min_score or max_frames out of range")
        from mediapipe.tasks import python as mp_tasks
        from mediapipe.tasks.python import vision

        opts = vision.FaceDetectorOptions(
            base_options=mp_tasks.BaseOptions(model_asset_path=str(path)),
            running_mode=vision.RunningMode.IMAGE,
            min_detection_confidence=min_score,
        )
        self._detector = vision.FaceDetector.create_from_options(opts)
        self.fps = float(fps)
        self.margin = float(margin)
        self.max_frames = int(max_frames)

    def __enter__(self) -> ClipFaces:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the detector."""
        if self._detector is not None:
            self._detector.close()
            self._detector = None

    def faces(self, video: Path) -> np.ndarray:
        """Grayscale face crops ``(N, 112, 112)`` uint8 of the largest face in each sampled frame.

        Raises:
            DatasetError: the video cannot be opened or decoded.
        """
        import cv2
        import mediapipe as mp

        if self._detector is None:
            raise DatasetError("ClipFaces is closed")
        cap = cv2.VideoCapture(str(video))
        if not cap.isOpened():
            raise DatasetError(f"cannot open video {Path(video).name}")
        src_fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        step = max(src_fps / self.fps, 1.0)
        crops: list[np.ndarray] = []
        index, next_take = 0, 0.0
        try:
            while len(crops) < self.max_frames:
                ok, frame = cap.read()
                if not ok:
                    break
                take = index >= next_take
                index += 1
                if not take:
                    continue
                next_take += step
                rgb = np.ascontiguousarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                found = self._detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb)).detections
                if not found:
                    continue
                box = max(found, key=lambda d: d.bounding_box.width * d.bounding_box.height).bounding_box
                side = max(box.width, box.height) * (1 + 2 * self.margin)
                cx, cy = box.origin_x + box.width / 2, box.origin_y + box.height / 2
                x0, y0 = round(cx - side / 2), round(cy - side / 2)
                x1, y1 = round(cx + side / 2), round(cy + side / 2)
                h, w = frame.shape[:2]
                pad = max(0, -x0, -y0, x1 - w, y1 - h)
                gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
                if pad:
                    gray = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
                crop = gray[y0 + pad : y1 + pad, x0 + pad : x1 + pad]
                crops.append(cv2.resize(crop, (112, 112), interpolation=cv2.INTER_AREA))
        finally:
            cap.release()
        if index == 0:
            raise DatasetError(f"no frame decoded from {Path(video).name}")
        return np.stack(crops) if crops else np.zeros((0, 112, 112), np.uint8)


def clip_features(net: FaceNet, faces: ClipFaces, video: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame features ``(T, 1280)`` and IFER probabilities ``(T, K)`` (T = frames with a face)."""
    crops = faces.faces(video)
    return net.infer(crops)
