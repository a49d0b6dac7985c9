"""Video clip → per-frame face crops → f features and IFER probabilities (the full clip path).

Frames are decoded with OpenCV and sampled to ``fps``; faces are found and cropped by the device's own
:class:`fedfer.agent.vision.faces.FaceDetector` (MediaPipe Tasks, SHA-256 pinned; largest face, the IFER
export's framing and the same 224x224 square crop as the vision pipeline), so a model trained or
personalized on these clips sees the crops the device produces. Crops are kept grayscale (IFER is trained
on grayscale faces; :meth:`~fedfer.agent.models.ifer.FaceNet.preprocess` replicates the channel) and run
through
:class:`~fedfer.agent.models.ifer.FaceNet` at its input size. Frames without a face are skipped. Nothing is
written to disk.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import numpy as np

from fedfer.agent.errors import DatasetError, ModelFileError
from fedfer.agent.models.ifer import FaceNet

__all__ = ["CROP_VERSION", "DETECTOR_SHA256", "ClipFaces", "clip_features"]

DETECTOR_SHA256 = "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"
#: Changes whenever the crops change (part of the per-clip cache keys).
CROP_VERSION = "device-crop/1"


class ClipFaces:
    """Face crops from video files (context manager owning the device's face detector).

    Args:
        detector_path: ``face_detection_short_range.tflite``.
        fps: sampling rate of frames (the source rate when higher).
        margin: extra border around the detected box, as a fraction of its size (the device's default).
        shift: the crop's centre moved down by this fraction of the box (an IFER export's framing).
        min_score: detector confidence threshold.
        max_frames: stop after this many face crops per clip.
    """

    def __init__(
        self,
        *,
        detector_path: Path,
        fps: float = 10.0,
        margin: float = 0.2,
        shift: float = 0.0,
        min_score: float = 0.5,
        max_frames: int = 64,
    ) -> None:
        from fedfer.agent.models.weights import WeightsError
        from fedfer.agent.vision.faces import FaceDetector

        if not 0 < fps <= 120 or not 0 <= margin <= 1 or not 0 < min_score < 1 or max_frames < 1:
            raise DatasetError("fps, margin, min_score or max_frames out of range")
        if not -0.5 <= shift <= 0.5:
            raise DatasetError("shift out of range")
        try:
            self._detector: FaceDetector | None = FaceDetector(
                model_path=Path(detector_path),
                sha256=DETECTOR_SHA256,
                min_confidence=min_score,
                margin=margin,
                shift=shift,
            )
        except WeightsError as exc:
            raise ModelFileError("face detector model missing or not the pinned file") from exc
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

    @classmethod
    def for_model(cls, net: FaceNet, *, detector_path: Path, fps: float = 10.0) -> ClipFaces:
        """Crops framed the way ``net`` expects (its export's framing, else the device's default margin)."""
        if net.framing is None:
            return cls(detector_path=detector_path, fps=fps)
        return cls(detector_path=detector_path, fps=fps, margin=net.framing.margin, shift=net.framing.shift)

    def image(self, path: Path) -> np.ndarray | None:
        """The grayscale crop ``(224, 224)`` uint8 of the largest face in a still image, or ``None``.

        Raises:
            DatasetError: the image cannot be read.
        """
        import cv2

        if self._detector is None:
            raise DatasetError("ClipFaces is closed")
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetError(f"cannot read image {Path(path).name}")
        face = self._detector.detect(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
        return None if face is None else np.asarray(cv2.cvtColor(face.crop, cv2.COLOR_RGB2GRAY))

    def faces(self, video: Path) -> np.ndarray:
        """Grayscale face crops ``(N, 224, 224)`` uint8 of the largest face in each sampled frame.

        Raises:
            DatasetError: the video cannot be opened or decoded.
        """
        import cv2

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
                face = self._detector.detect(np.ascontiguousarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
                if face is not None:
                    crops.append(cv2.cvtColor(face.crop, cv2.COLOR_RGB2GRAY))
        finally:
            cap.release()
        if index == 0:
            raise DatasetError(f"no frame decoded from {Path(video).name}")
        side = self._detector.crop_size
        return np.stack(crops) if crops else np.zeros((0, side, side), np.uint8)


def clip_features(net: FaceNet, faces: ClipFaces, video: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame features ``(T, 1280)`` and IFER probabilities ``(T, K)`` (T = frames with a face)."""
    crops = faces.faces(video)
    return net.infer(crops)
