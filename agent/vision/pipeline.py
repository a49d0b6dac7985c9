"""The on-device vision pipeline: frames → largest face → ``f`` → ``g`` → :class:`FrameRecord` per frame.

Frames with a face are batched across frames (``batch_size`` crops per forward pass, channels-last,
``torch.inference_mode()``), so the network runs a few large passes instead of many small ones. Records are
grouped into sessions (:class:`~fedfer.agent.vision.sessions.SessionCutter`: a gap of more than
``session_gap_s`` seconds without a face closes the session) and streamed to a :class:`SessionWriter` (the
encrypted :class:`fedfer.agent.store.cache.FeatureCache`) batch by batch, so a crash or a failing source loses
at most the batch in flight. Frames and crops stay in RAM and are dropped as soon as their features exist.
The same input always gives the same features.

Two frame models fit (:class:`FrameModel`):

* :class:`IferModel`: the paper's frozen MobileNetV2 ``f`` (:mod:`fedfer.agent.models.extractor`) + head
  ``g`` (:class:`fedfer.agent.models.ifer.IferHead`);
* :class:`ExportedIferModel`: an IFER export (:func:`fedfer.agent.models.ifer.load_ifer`; ``f`` possibly
  fine-tuned, ``g`` trained), so cached features match what the video model ``v`` is trained on.

The daemon's vision worker runs frames one at a time through :meth:`VisionPipeline.process`, bound to the
configuration by :func:`open_vision`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

import numpy as np
import torch

from fedfer.agent.capture.video import Frame
from fedfer.agent.config import AgentConfig
from fedfer.agent.errors import ComponentUnavailableError
from fedfer.agent.files import MOBILENET_TFLITE
from fedfer.agent.models.extractor import FeatureExtractor, load_feature_extractor
from fedfer.agent.models.ifer import FaceNet, IferHead
from fedfer.agent.models.weights import WeightsError
from fedfer.agent.records import FEATURE_DIM, FrameRecord
from fedfer.agent.vision.faces import Face, FaceDetector, detector_model_file
from fedfer.agent.vision.sessions import SessionCutter
from fedfer.security.errors import ValidationError

__all__ = [
    "ExportedIferModel",
    "FrameModel",
    "IferModel",
    "PipelineStats",
    "Session",
    "SessionWriter",
    "VisionPipeline",
    "load_frame_model",
    "open_vision",
]


class FrameModel(Protocol):
    """What the pipeline needs from the networks: ``f`` then ``g``."""

    num_classes: int

    def features(self, faces: np.ndarray) -> np.ndarray:
        """``(N, 1280)`` float32 features for uint8 RGB crops ``(N, S, S, 3)``."""
        ...

    def classify(self, features: np.ndarray) -> np.ndarray:
        """``(N, K)`` float32 class probabilities for features ``(N, 1280)``."""
        ...


class SessionWriter(Protocol):
    """Where the pipeline writes sessions (satisfied by :class:`fedfer.agent.store.cache.FeatureCache`)."""

    def begin_session(self) -> str:
        """Start a session; return its id."""
        ...

    def append_batch(self, session_id: str, records: Iterable[FrameRecord]) -> list[int]:
        """Store records of the session."""
        ...

    def end_session(self, session_id: str) -> None:
        """Close the session."""
        ...


def _softmax(head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        logits = head(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        return torch.softmax(logits, dim=1).numpy().astype(np.float32, copy=True)


class IferModel:
    """Frozen ``f`` (:class:`FeatureExtractor`) and head ``g`` (:class:`IferHead`, eval mode).

    Args:
        extractor: MobileNetV2 with real weights and their normalization.
        head: the IFER head (trained weights are the caller's business; it is put in eval mode).
    """

    def __init__(self, *, extractor: FeatureExtractor, head: IferHead) -> None:
        if not isinstance(extractor, FeatureExtractor) or not isinstance(head, IferHead):
            raise ValidationError("IferModel needs a FeatureExtractor and an IferHead")
        self.extractor = extractor
        self.head = head.eval()
        self.num_classes = head.num_classes

    def __repr__(self) -> str:
        return f"IferModel({self.extractor!r}, classes={self.num_classes})"

    def features(self, faces: np.ndarray) -> np.ndarray:
        """See :class:`FrameModel`."""
        return self.extractor(faces)

    def classify(self, features: np.ndarray) -> np.ndarray:
        """See :class:`FrameModel`."""
        return _softmax(self.head, features)


class ExportedIferModel:
    """Adapter for :class:`fedfer.agent.models.ifer.FaceNet` (an IFER export).

    Runs :meth:`FaceNet.fused` (BatchNorm folded into the convolutions), the same inference copy that
    :meth:`FaceNet.infer` uses for training v and for personalization, at the export's ``input_size``
    (crops of any size are resized to it), so the device's features are the ones v was trained on.

    Args:
        net: the loaded ``FaceNet``.
        channels_last: run ``f`` in channels-last layout.
        fuse_batchnorm: fold BatchNorm into the convolutions (the fast path); ``False`` runs ``net`` as is.
    """

    def __init__(self, net: FaceNet, *, channels_last: bool = True, fuse_batchnorm: bool = True) -> None:
        self.net = net.fused() if fuse_batchnorm else net.eval()
        self.channels_last = bool(channels_last)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=memory_format)  # type: ignore[call-overload]
        self.num_classes = int(net.num_classes)

    def __repr__(self) -> str:
        return f"ExportedIferModel(input_size={self.net.input_size}, classes={self.num_classes})"

    def features(self, faces: np.ndarray) -> np.ndarray:
        """See :class:`FrameModel`."""
        with torch.inference_mode():
            f = self.net.embed(faces, channels_last=self.channels_last)
            return f.numpy().astype(np.float32, copy=True)

    def classify(self, features: np.ndarray) -> np.ndarray:
        """See :class:`FrameModel`."""
        return _softmax(self.net.head, features)


def load_frame_model(
    *,
    feature_weights: str | Path | None = None,
    ifer: str | Path | None = None,
    head: str | Path | None = None,
    num_classes: int = 6,
    cache_dir: str | Path | None = None,
    channels_last: bool = True,
    batch_size: int = 4,
    fuse_batchnorm: bool = True,
    emulate_tflite_quantization: bool = False,
) -> FrameModel:
    """Build the frame model from files.

    Exactly one of two set-ups:

    * ``ifer``: an IFER export (manifest ``.json`` or its folder, :func:`fedfer.agent.models.ifer.save_ifer`);
    * ``feature_weights`` (``.tflite`` or torchvision ``.pth``) plus ``head``, a ``torch.save``'d state dict
      of :class:`IferHead` with ``num_classes`` classes. Without ``head`` the head keeps its fresh
      initialization: its probabilities are meaningless (only for timing and feature extraction).

    ``emulate_tflite_quantization`` (``.tflite`` feature weights only) replays the TFLite graph's uint8
    activation rounding in ``f``: closer to the TFLite interpreter, about 10% slower (docs/vision.md).

    Raises:
        ValidationError: neither or both set-ups given; quantization emulation asked for other weights.
        WeightsError: a weight file is missing or does not fit.
    """
    from fedfer.agent.models.weights import WeightsError

    if (ifer is None) == (feature_weights is None):
        raise ValidationError("give either an IFER export or feature weights (with an optional head)")
    if ifer is not None:
        from fedfer.agent.models.ifer import load_ifer

        if emulate_tflite_quantization:
            raise ValidationError("emulate_tflite_quantization applies to .tflite feature weights only")
        return ExportedIferModel(
            load_ifer(Path(ifer)), channels_last=channels_last, fuse_batchnorm=fuse_batchnorm
        )
    assert feature_weights is not None  # narrowed above; not validation
    extractor = load_feature_extractor(
        feature_weights,
        cache_dir=cache_dir,
        channels_last=channels_last,
        batch_size=batch_size,
        fuse_batchnorm=fuse_batchnorm,
        emulate_tflite_quantization=emulate_tflite_quantization,
    )
    g = IferHead(num_classes=num_classes)
    if head is not None:
        try:
            state = torch.load(Path(head), map_location="cpu", weights_only=True)
            g.load_state_dict(state, strict=True)
        except Exception as exc:  # corrupt file, wrong keys or shapes: all mean "does not fit"
            raise WeightsError("IFER head file does not fit IferHead") from exc
    return IferModel(extractor=extractor, head=g)


@dataclass(frozen=True, slots=True)
class _Done:
    error: BaseException | None


@dataclass
class Session:
    """Records of one session (one stretch of frames with a face).

    Attributes:
        session_id: the sink's id (or a local counter id when no sink is attached).
        records: the frames' records in time order (kept only when ``keep_records``).
        frames: number of records written.
    """

    session_id: str
    records: list[FrameRecord] = field(default_factory=list)
    frames: int = 0

    def __repr__(self) -> str:
        return f"Session(id={self.session_id[:8]}…, frames={self.frames})"


@dataclass
class PipelineStats:
    """Counters and per-stage wall time (seconds) of a pipeline run.

    Attributes:
        frames: frames seen.
        faces: frames with a face.
        sessions: sessions started.
        stored_bytes: bytes reported by the sink (0 without one).
        seconds: wall time per stage: ``face``, ``features`` (f), ``head`` (g), ``store``.
    """

    frames: int = 0
    faces: int = 0
    sessions: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: {"face": 0.0, "features": 0.0, "head": 0.0, "store": 0.0}
    )


class VisionPipeline:
    """Frames in, per-session :class:`FrameRecord` lists out (and into the sink).

    Args:
        detector: the face detector (owned: closed by :meth:`close`).
        model: ``f`` and ``g``.
        sink: encrypted cache or other :class:`SessionWriter`; ``None`` keeps records only in the returned
            sessions.
        batch_size: face crops per forward pass (batched across frames).
        session_gap_s: a gap longer than this without a face closes the session.
        keep_records: keep each session's records in RAM and return them (tests, CLI); the sink gets them
            anyway.
        overlap_detection: in :meth:`run`, read and detect in a helper thread while ``f`` runs here.
        clock: timer for the stage statistics.
    """

    def __init__(
        self,
        *,
        detector: FaceDetector,
        model: FrameModel,
        sink: SessionWriter | None = None,
        batch_size: int = 4,
        session_gap_s: float = 2.0,
        keep_records: bool = True,
        overlap_detection: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if type(batch_size) is not int or not 1 <= batch_size <= 256:
            raise ValidationError("batch_size must be an int in [1, 256]")
        if not 0.0 < session_gap_s <= 3600.0:
            raise ValidationError("session_gap_s must lie in (0, 3600]")
        self.detector = detector
        self.model = model
        self.sink = sink
        self.batch_size = batch_size
        self.session_gap_s = float(session_gap_s)
        self.keep_records = keep_records
        self.overlap_detection = bool(overlap_detection)
        self.stats = PipelineStats()
        self._clock = clock
        self._pending: list[tuple[float, Face]] = []
        self._session: Session | None = None
        self._sessions = SessionCutter(gap_s=self.session_gap_s)
        self._local_ids = 0

    def __repr__(self) -> str:
        return f"VisionPipeline(model={self.model!r}, batch_size={self.batch_size})"

    def __enter__(self) -> VisionPipeline:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the detector (records still pending are *not* flushed; call :meth:`finish` first)."""
        self._pending.clear()
        self.detector.close()

    # -- per-frame API (the daemon's VisionStage) --------------------------------------------------------

    def process(self, image: np.ndarray, timestamp: float) -> FrameRecord | None:
        """Run face → f → g on one RGB frame, unbatched; ``None`` when no face is found."""
        face = self._detect(image)
        self.stats.frames += 1
        if face is None:
            return None
        self.stats.faces += 1
        return self._infer([(float(timestamp), face)])[0]

    # -- streaming API ----------------------------------------------------------------------------------

    def run(self, frames: Iterable[Frame]) -> Iterator[Session]:
        """Process ``frames``; yield each session when it closes (by a gap, or at the end).

        With ``overlap_detection`` the source is read and faces are detected in a helper thread while this
        thread runs ``f`` and ``g`` (OpenCV, MediaPipe and torch release the GIL), through a small bounded
        queue; order and results are the same as without it.

        If iterating ``frames`` raises (a vanished camera, a truncated file), everything decoded before is
        processed and stored and the open session is ended before the error propagates.
        """
        detected: Generator[tuple[float, Face | None], None, None] = (
            self._detect_in_thread(frames)
            if self.overlap_detection
            else ((f.timestamp, self._detect(f.image)) for f in frames)
        )
        try:
            for timestamp, face in detected:
                yield from self._accept(timestamp, face)
        finally:
            detected.close()  # stops and joins the helper thread before anything else
            # Runs on normal end and on a source error alike: what was decoded is not lost.
            closed = self.finish()
        if closed is not None:
            yield closed

    def push(self, frame: Frame) -> list[Session]:
        """Feed one frame; returns the sessions this frame closed (at most one)."""
        return self._accept(frame.timestamp, self._detect(frame.image))

    def _accept(self, timestamp: float, face: Face | None) -> list[Session]:
        self.stats.frames += 1
        if face is None:
            if not self._sessions.ended("", timestamp):
                return []
            self._sessions.end("")
            return self._close_session()
        _, new = self._sessions.tag("", timestamp)
        closed = self._close_session() if new else []  # the faces before the gap (none at the start)
        self.stats.faces += 1
        self._pending.append((timestamp, face))
        if len(self._pending) >= self.batch_size:
            self._flush()
        return closed

    def _detect_in_thread(self, frames: Iterable[Frame]) -> Generator[tuple[float, Face | None], None, None]:
        out: queue.Queue[tuple[float, Face | None] | _Done] = queue.Queue(maxsize=2 * self.batch_size + 2)
        stop = threading.Event()

        def put(item: tuple[float, Face | None] | _Done) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for frame in frames:
                    if not put((frame.timestamp, self._detect(frame.image))):
                        return
                put(_Done(None))
            except BaseException as exc:  # handed to the consuming thread, which re-raises it
                put(_Done(exc))

        worker = threading.Thread(target=work, name="fedfer-face-detect", daemon=True)
        worker.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, _Done):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            stop.set()
            worker.join()

    def finish(self) -> Session | None:
        """Flush pending faces and end the open session; returns it (or ``None``)."""
        self._sessions.end("")
        closed = self._close_session()
        return closed[0] if closed else None

    # -- internals --------------------------------------------------------------------------------------

    def _detect(self, image: np.ndarray) -> Face | None:
        t0 = self._clock()
        face = self.detector.detect(image)
        self.stats.seconds["face"] += self._clock() - t0
        return face

    def _infer(self, items: list[tuple[float, Face]]) -> list[FrameRecord]:
        crops = np.stack([face.crop for _, face in items])
        t0 = self._clock()
        feats = self.model.features(crops)
        t1 = self._clock()
        probs = self.model.classify(feats)
        t2 = self._clock()
        self.stats.seconds["features"] += t1 - t0
        self.stats.seconds["head"] += t2 - t1
        if feats.shape != (len(items), FEATURE_DIM) or probs.shape[0] != len(items):
            raise ValidationError("frame model returned arrays of the wrong shape")
        feats16 = feats.astype(np.float16)
        return [
            FrameRecord(
                timestamp=t,
                feature=feats16[i],
                ifer_probs=np.ascontiguousarray(probs[i], dtype=np.float32),
                box=face.box,
                score=face.score,
            )
            for i, (t, face) in enumerate(items)
        ]

    def _flush(self) -> None:
        if not self._pending:
            return
        items, self._pending = self._pending, []
        records = self._infer(items)
        session = self._open_session()
        t0 = self._clock()
        if self.sink is not None:
            self.sink.append_batch(session.session_id, records)
        self.stats.seconds["store"] += self._clock() - t0
        session.frames += len(records)
        if self.keep_records:
            session.records.extend(records)

    def _open_session(self) -> Session:
        if self._session is None:
            t0 = self._clock()
            if self.sink is not None:
                sid = self.sink.begin_session()
            else:
                self._local_ids += 1
                sid = f"{self._local_ids:032x}"
            self.stats.seconds["store"] += self._clock() - t0
            self._session = Session(session_id=sid)
            self.stats.sessions += 1
        return self._session

    def _close_session(self) -> list[Session]:
        self._flush()
        session, self._session = self._session, None
        if session is None:
            return []
        if self.sink is not None:
            t0 = self._clock()
            self.sink.end_session(session.session_id)
            self.stats.seconds["store"] += self._clock() - t0
        return [session]


def open_vision(config: AgentConfig) -> VisionPipeline:
    """The daemon's vision stage: a :class:`VisionPipeline` run frame by frame
    (:meth:`~VisionPipeline.process`).

    Reads ``config.vision`` (detector model, pinned digest, score, margin, quantization emulation) and
    ``vision.ifer_model`` (an IFER export) or ``vision.feature_weights`` (+ ``vision.ifer_head``); the default
    feature weights are the TFLite MobileNetV2 in the asset folder
    (:data:`fedfer.agent.files.MOBILENET_TFLITE`). A missing detector file is downloaded from
    ``vision.detector_url`` into the agent's model folder and verified against ``vision.detector_sha256``
    (:func:`fedfer.agent.vision.faces.detector_model_file`); an empty digest is refused.

    Raises:
        ComponentUnavailableError: a model file is missing, cannot be downloaded or is refused, or the
            detector digest is not pinned.
    """
    vision = config.vision
    ifer = vision.ifer_model or None
    weights = vision.feature_weights or (None if ifer else MOBILENET_TFLITE)
    head = vision.ifer_head or None
    try:
        detector_path = detector_model_file(
            config.model_path(vision.detector_model), sha256=vision.detector_sha256, url=vision.detector_url
        )
        model = load_frame_model(
            ifer=config.model_path(ifer) if ifer else None,
            feature_weights=config.model_path(weights) if weights else None,
            head=config.model_path(head) if head else None,
            batch_size=1,
            emulate_tflite_quantization=vision.emulate_tflite_quantization,
        )
        # An IFER export that states its framing is cropped the way its training faces were framed.
        framing = model.net.framing if isinstance(model, ExportedIferModel) else None
        detector = FaceDetector(
            model_path=detector_path,
            sha256=vision.detector_sha256,
            min_confidence=vision.min_score,
            margin=vision.margin if framing is None else framing.margin,
            shift=0.0 if framing is None else framing.shift,
        )
    except (WeightsError, ValidationError) as exc:
        raise ComponentUnavailableError(f"vision models unavailable: {exc}") from exc
    return VisionPipeline(detector=detector, model=model, batch_size=1, keep_records=False)
