"""Bindings between the daemon's workers and the agent's components.

The workers in :mod:`agent.workers` only move data and keep time; what happens to the data is decided here:

* :class:`SourceSequence` reads a camera, a stream, a file or a folder of files through the capture
  component, sampled to the configured rate (frames are RGB ``uint8`` arrays kept in RAM).
* :func:`open_vision` binds the vision pipeline (faces → crop → MobileNetV2 → IFER) when it is installed.
* :func:`open_record_sink` binds the encrypted cache (:class:`CacheSink`, one cache session per session
  tag); :class:`SessionCutter` decides session boundaries.
* :data:`JOBS` maps control-plane jobs (``personalize``, ``join``) to the learning and federation code, and
  :func:`cache_sessions`, :func:`cache_forget`, :func:`cache_purge` serve the cache commands.

Components that are missing raise :class:`ComponentUnavailableError` with a clear message instead of being
imitated: the daemon keeps running and reports the stage as unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

import numpy as np

from agent.config import AgentConfig
from agent.lock import ensure_private_dir
from agent.records import FEATURE_DIM, FrameRecord
from security.errors import FedferError, ValidationError

__all__ = [
    "BUDGET_FILE",
    "CACHE_DIR",
    "FEDERATION_DIR",
    "JOBS",
    "MODELS_DIR",
    "PROCESSED_FILE",
    "ROUND_BUDGET_FILE",
    "VIDEO_SUFFIXES",
    "CacheSink",
    "ComponentUnavailableError",
    "Frame",
    "FrameSource",
    "JobCancelledError",
    "ProcessedFiles",
    "RecordSink",
    "SessionCutter",
    "SourceSequence",
    "VisionStage",
    "cache_forget",
    "cache_purge",
    "cache_sessions",
    "cancel_jobs",
    "computations_running",
    "decode_record",
    "encode_record",
    "open_cache",
    "open_record_sink",
    "open_source",
    "open_vision",
]

_log = logging.getLogger(__name__)
T = TypeVar("T")

# Where the daemon keeps things inside the state directory.
CACHE_DIR = "cache"
MODELS_DIR = "models"
FEDERATION_DIR = "federation"
BUDGET_FILE = "privacy-budget.json"
ROUND_BUDGET_FILE = "round-privacy-budget.json"
PROCESSED_FILE = "capture-processed.json"
VIDEO_SUFFIXES = frozenset({".avi", ".flv", ".m4v", ".mkv", ".mov", ".mp4", ".webm"})
_MAX_CLASSES = 16


class ComponentUnavailableError(FedferError):
    """A component the daemon would bind (vision, cache, learning, federation) is not installed or usable."""


def _component(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ComponentUnavailableError(f"{what} is not available ({module}: {exc.msg})") from None


# ------------------------------------------------------------------------------------------- capture


@dataclass(frozen=True, slots=True)
class Frame:
    """One sampled frame.

    Attributes:
        segment: opaque id of the stretch of source it came from (one file, or one camera opening).
        timestamp: seconds since the start of the segment.
        due_s: seconds since the capture started at which a real-time capture sends it.
        image: RGB ``uint8`` array ``(H, W, 3)``.
    """

    segment: str
    timestamp: float
    due_s: float
    image: np.ndarray

    def __repr__(self) -> str:
        return f"Frame(timestamp={self.timestamp:.3f}, shape={self.image.shape})"


class FrameSource(Protocol):
    """An iterable of sampled frames that can be closed early (releasing the camera)."""

    def __iter__(self) -> Iterator[Frame]:
        """Yield frames in order; stop at the end of the source."""
        ...

    def close(self) -> None:
        """Release the device or file."""
        ...


class SourceSequence:
    """``capture.source`` as a sequence of segments, each read by the capture component (``agent.capture``).

    A folder is read file by file (sorted, video suffixes only) and each file is one segment; ``loop`` starts
    again at the end. A camera or stream is one segment. A file that turns out truncated keeps the frames
    decoded before the cut; any other source failure ends the iteration with the capture error.
    """

    def __init__(
        self, *, source: str, fps: float, max_width: int, loop: bool, ledger: ProcessedFiles | None = None
    ) -> None:
        if fps <= 0 or max_width < 16:
            raise ValidationError("fps must be positive and max_width at least 16")
        self.source = source
        self.fps = fps
        self.max_width = max_width
        self.loop = loop
        # Files read to the end are remembered (when not looping) so a restart does not cache them twice.
        self.ledger = ledger if not loop else None
        self._current: Any = None
        self._closed = False

    def _inputs(self) -> list[str | int]:
        if self.source.startswith("camera:"):
            return [int(self.source[len("camera:") :])]
        if "://" in self.source:
            return [self.source]
        path = Path(self.source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not files:
                raise ValidationError("capture.source folder holds no video files")
            return [str(p) for p in files]
        if not path.is_file():
            capture = _component("agent.capture", "video capture")
            raise capture.SourceUnavailableError("capture.source does not exist")
        return [str(path)]

    def __iter__(self) -> Iterator[Frame]:
        """Yield the sampled frames of every input in turn (again and again with ``loop``)."""
        capture = _component("agent.capture", "video capture")
        inputs = self._inputs()
        offset = 0.0
        while not self._closed:
            for item in inputs:
                if self.ledger is not None and isinstance(item, str) and self.ledger.done(Path(item)):
                    continue
                segment = secrets.token_hex(6)
                last = 0.0
                self._current = capture.VideoSource(
                    source=item, sample_fps=self.fps, max_width=self.max_width
                )
                try:
                    for frame in self._current.frames():
                        last = float(frame.timestamp)
                        yield Frame(segment, last, offset + last, frame.image)
                except capture.TruncatedSourceError:
                    _log.warning("a video file ended early; its decodable frames were kept")
                finally:
                    self._current.close()
                    self._current = None
                if self._closed:
                    return
                if self.ledger is not None and isinstance(item, str):
                    self.ledger.add(Path(item))
                offset += last + 1.0 / self.fps
            if not self.loop:
                return

    def close(self) -> None:
        """Stop after the current frame and release the camera or file."""
        self._closed = True
        if self._current is not None:
            self._current.close()


class ProcessedFiles:
    """The video files a non-looping capture has read to the end, kept in the state directory.

    A file is identified by a SHA-256 over its resolved path, size and modification time (so the ledger names
    no file, and a file replaced in place is read again). The ledger is rewritten atomically (0600).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._done: set[str] = set()
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            loaded = []
        except (OSError, ValueError):
            _log.warning("the processed-files ledger is unreadable; starting a new one")
            loaded = []
        if isinstance(loaded, list):
            self._done = {x for x in loaded if isinstance(x, str) and len(x) == 64}

    @staticmethod
    def _key(file: Path) -> str | None:
        try:
            info = file.stat()
        except OSError:
            return None
        text = f"{file.resolve()}\0{info.st_size}\0{info.st_mtime_ns}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    def done(self, file: Path) -> bool:
        """Whether ``file`` (as it is now) was read to the end before."""
        key = self._key(file)
        return key is not None and key in self._done

    def add(self, file: Path) -> None:
        """Remember ``file`` as read to the end."""
        key = self._key(file)
        if key is None or key in self._done:
            return
        self._done.add(key)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps(sorted(self._done)).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


def open_source(config: AgentConfig) -> FrameSource:
    """The frame source ``[capture]`` describes (file sources skip files already read, unless looping)."""
    cap = config.capture
    ledger = None
    if not cap.loop and not cap.source.startswith("camera:") and "://" not in cap.source:
        ledger = ProcessedFiles(ensure_private_dir(config.state_dir) / PROCESSED_FILE)
    return SourceSequence(
        source=cap.source, fps=cap.fps, max_width=cap.max_width, loop=cap.loop, ledger=ledger
    )


# -------------------------------------------------------------------------------------------- vision


class VisionStage(Protocol):
    """Frame → :class:`FrameRecord` (or ``None`` when no face is found)."""

    def process(self, image: np.ndarray, timestamp: float) -> FrameRecord | None:
        """Run the pipeline on one RGB frame."""
        ...

    def close(self) -> None:
        """Release models."""
        ...


def open_vision(config: AgentConfig) -> VisionStage:
    """Bind the vision pipeline (``agent.pipeline``).

    Raises:
        ComponentUnavailableError: the pipeline is not installed or cannot load its models.
    """
    pipeline = _component("agent.pipeline", "the vision pipeline")
    factory = getattr(pipeline, "daemon_stage", None)
    if factory is None:
        raise ComponentUnavailableError(
            "the vision pipeline has no daemon binding (agent.pipeline.daemon_stage)"
        )
    stage: VisionStage = factory(config)
    return stage


class SessionCutter:
    """Assigns records to sessions: a new session starts with a new segment or after a gap without faces."""

    def __init__(self, *, gap_s: float) -> None:
        self.gap_s = gap_s
        self._segment: str | None = None
        self._last = 0.0
        self._tag = ""

    def tag(self, segment: str, timestamp: float) -> tuple[str, bool]:
        """Return ``(session tag, whether it is new)`` for a face seen at ``timestamp`` in ``segment``."""
        new = segment != self._segment or timestamp - self._last > self.gap_s or timestamp < self._last
        if new:
            self._segment = segment
            self._tag = secrets.token_hex(8)
        self._last = timestamp
        return self._tag, new


def encode_record(tag: str, record: FrameRecord) -> list[bytes]:
    """Wire form of one record for the vision → learner queue (RAM only)."""
    header = {
        "session": tag,
        "ts": record.timestamp,
        "box": list(record.box),
        "score": record.score,
    }

    return [json.dumps(header).encode("utf-8"), record.feature.tobytes(), record.ifer_probs.tobytes()]


def decode_record(parts: Sequence[bytes]) -> tuple[str, FrameRecord] | None:
    """Inverse of :func:`encode_record`; ``None`` for anything malformed."""

    if len(parts) != 3 or len(parts[0]) > 4096 or len(parts[1]) != FEATURE_DIM * 2:
        return None
    if len(parts[2]) % 4 or not 0 < len(parts[2]) // 4 <= _MAX_CLASSES:
        return None
    try:
        header = json.loads(parts[0])
        record = FrameRecord(
            timestamp=float(header["ts"]),
            feature=np.frombuffer(parts[1], dtype=np.float16).copy(),
            ifer_probs=np.frombuffer(parts[2], dtype=np.float32).copy(),
            box=(
                float(header["box"][0]),
                float(header["box"][1]),
                float(header["box"][2]),
                float(header["box"][3]),
            ),
            score=float(header["score"]),
        )
        tag = str(header["session"])
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return tag, record


# --------------------------------------------------------------------------------------------- cache


class RecordSink(Protocol):
    """Where the learner puts records: the encrypted cache, one cache session per session tag."""

    def put(self, tag: str, record: FrameRecord, *, now: float) -> None:
        """Store one record in the session ``tag`` (opened on first use)."""
        ...

    def idle(self, now: float) -> None:
        """Close sessions that received nothing for a while."""
        ...

    def close(self) -> None:
        """Close every open session and the cache."""
        ...


def open_cache(config: AgentConfig) -> Any:
    """Open the encrypted feature cache in ``<state_dir>/cache`` with the configured retention and key store.

    Several processes may open it at once (the learner writes, the supervisor lists and forgets). The key
    store follows ``cache.key_store`` (:func:`agent.cache_keys.key_store_for`): with ``auto`` a new cache
    keeps its KEK in the OS keyring when one is usable, else in a 0600 file; an existing key file is kept.

    Raises:
        ComponentUnavailableError: the cache is not installed or its key store is unusable.
    """
    cache = _component("agent.cache", "the encrypted cache")
    keys = _component("agent.cache_keys", "the cache key store")
    directory = config.state_dir / CACHE_DIR
    try:
        key_store = keys.key_store_for(directory, config.cache.key_store)
    except FedferError as exc:
        raise ComponentUnavailableError(f"the cache key store is unusable ({exc})") from None
    return cache.FeatureCache(
        directory,
        key_store=key_store,
        max_age_s=config.cache.retention_days * 86_400.0,
        max_bytes=config.cache.max_bytes,
    )


class CacheSink:
    """A :class:`RecordSink` over the encrypted cache: one cache session per session tag.

    A new tag seals the sessions before it (vision cuts one stream into consecutive sessions); a session
    that receives nothing for ``idle_s`` is sealed too. Every record is its own transaction, so a killed
    learner loses at most the record in flight; its unsealed session stays readable.
    """

    def __init__(self, cache: Any, *, idle_s: float) -> None:
        self._cache = cache
        self._idle_s = idle_s
        self._open: dict[str, tuple[str, float]] = {}

    def put(self, tag: str, record: FrameRecord, *, now: float) -> None:
        """Store ``record`` in the cache session of ``tag`` (begun on first use)."""
        entry = self._open.get(tag)
        if entry is None:
            self._seal_all()
            entry = (self._cache.begin_session(), now)
        session_id = entry[0]
        try:
            self._cache.append(session_id, record)
        except FedferError:
            # The session was forgotten or purged meanwhile (by the control plane): start a new one.
            session_id = self._cache.begin_session()
            self._cache.append(session_id, record)
        self._open[tag] = (session_id, now)

    def idle(self, now: float) -> None:
        """Seal sessions idle for longer than ``idle_s``."""
        for tag, (session_id, last) in list(self._open.items()):
            if now - last > self._idle_s:
                self._seal(session_id)
                del self._open[tag]

    def _seal(self, session_id: str) -> None:
        # A session forgotten meanwhile has nothing left to seal.
        with contextlib.suppress(FedferError):
            self._cache.end_session(session_id)

    def _seal_all(self) -> None:
        for session_id, _ in self._open.values():
            self._seal(session_id)
        self._open.clear()

    def close(self) -> None:
        """Seal every open session and close the cache."""
        self._seal_all()
        self._cache.close()


def open_record_sink(config: AgentConfig) -> RecordSink:
    """The learner's sink: the encrypted cache (``agent.cache``).

    Raises:
        ComponentUnavailableError: the cache is not installed.
    """
    return CacheSink(open_cache(config), idle_s=config.vision.session_gap_s + 1.0)


def cache_sessions(config: AgentConfig) -> list[dict[str, Any]]:
    """The cached sessions: ids, creation times, frame counts, sizes; never their contents."""
    cache = open_cache(config)
    try:
        return [
            {
                "id": info.session_id,
                "created": info.created,
                "frames": info.frames,
                "bytes": info.bytes,
                "sealed": info.sealed,
            }
            for info in cache.sessions()
        ]
    finally:
        cache.close()


def cache_forget(config: AgentConfig, session_id: str) -> dict[str, Any]:
    """Delete one session and destroy its key (crypto-shredding; the cache also rotates its KEK)."""
    cache = open_cache(config)
    try:
        cache.forget(session_id)
    finally:
        cache.close()
    return {"forgotten": session_id}


def cache_purge(config: AgentConfig) -> dict[str, Any]:
    """Delete every session and replace the key-encryption key."""
    cache = open_cache(config)
    try:
        count = len(cache.sessions())
        cache.purge()
    finally:
        cache.close()
    return {"purged": count}


# ---------------------------------------------------------------------------------------------- jobs


def _cached_clips(config: AgentConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Features ``(T, 1280)`` float32 and IFER probabilities ``(T, K)`` of every readable cached session."""
    cache = open_cache(config)
    features: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    try:
        for info in cache.sessions():
            records = [r for _, r in cache.recover_session(info.session_id).records]
            if len(records) < 2:
                continue
            features.append(np.stack([r.feature for r in records]).astype(np.float32))
            probs.append(np.stack([r.ifer_probs for r in records]).astype(np.float32))
    finally:
        cache.close()
    if len(features) < config.learning.min_sessions:
        raise ValidationError(
            f"personalization needs at least {config.learning.min_sessions} cached session(s) of 2+ frames; "
            f"{len(features)} available"
        )
    return features, probs


def _personalize_from(
    config: AgentConfig, central: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Personalize ``v`` from the ``central`` arrays on the cached sessions (DP-SGD when ``privacy.dp``)."""
    learning = _component("agent.learning.personalize", "personalization")
    dp_module = _component("agent.learning.dp", "differential privacy")
    models = _component("agent.models", "the video model")
    features, probs = _cached_clips(config)
    privacy = config.privacy
    dp = budget = None
    if privacy.dp:
        dp = dp_module.DPConfig(
            target_epsilon=privacy.target_epsilon or None,
            noise_multiplier=privacy.noise_multiplier or None,
            delta=float(privacy.delta),
            max_grad_norm=privacy.max_grad_norm,
        )
        budget = dp_module.PrivacyBudget(
            path=config.state_dir / BUDGET_FILE, epsilon_limit=privacy.budget, delta=float(privacy.delta)
        )
    settings = learning.PersonalizeConfig(
        per_class=config.learning.max_per_class,
        p_threshold=config.learning.confidence_threshold,
        lr=float(config.learning.lr),
        epochs=config.learning.epochs,
    )
    model, result = learning.personalize(
        central,
        features,
        probs,
        num_classes=config.learning.num_classes,
        config=settings,
        dp=dp,
        budget=budget,
    )
    summary = {
        "sessions": len(features),
        "selected": int(result.selected),
        "per_class": [int(c) for c in result.per_class],
        "dp": privacy.dp,
        "epsilon": result.epsilon,
        "epsilon_total": result.epsilon_total,
        "seconds": round(float(result.seconds), 3),
    }
    arrays: dict[str, np.ndarray] = models.to_named_arrays(model)
    return arrays, summary


def _central_or_initial(config: AgentConfig) -> tuple[dict[str, np.ndarray], str]:
    """The last central ``v`` this device fetched, else a freshly initialized one."""
    export = _component("agent.learning.export", "model files")
    manifest = config.state_dir / MODELS_DIR / "central.json"
    if manifest.is_file():
        arrays, meta = export.load_exported(manifest)
        return dict(arrays), str(meta.get("version", "central"))
    models = _component("agent.models", "the video model")
    return dict(models.to_named_arrays(models.VideoModel(num_classes=config.learning.num_classes))), "initial"


def _save_model(config: AgentConfig, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    export = _component("agent.learning.export", "model files")
    folder = ensure_private_dir(config.state_dir / MODELS_DIR)
    export.save_exported(folder, name, arrays, {"kind": "v", "classes": config.learning.num_classes, **meta})


def _personalize(config: AgentConfig) -> dict[str, Any]:
    """Job ``personalize``: fine-tune ``v`` on the cached sessions; the result stays on the device."""
    central, version = _central_or_initial(config)

    async def go() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return await _in_daemon_thread(_personalize_from, config, central)

    # Cancellable: a stopping agent does not wait for the training; nothing is saved unless it finished.
    arrays, summary = _run_cancellable(go())
    _save_model(config, "personal", arrays, {"base_version": version})
    return {"base_version": version, **summary}


def _round_privacy(config: AgentConfig) -> tuple[Any, Any]:
    """``(RoundDPConfig, RoundBudget)`` for ``privacy.round_dp`` (``(None, None)`` when it is off).

    Raises:
        PrivacyBudgetExceededError: the device's round budget cannot pay for another round.
    """
    privacy = config.privacy
    if not privacy.round_dp:
        return None, None
    update = _component("agent.learning.update", "user-level DP for rounds")
    delta = float(privacy.delta)
    if privacy.round_noise_multiplier > 0:
        dp = update.RoundDPConfig(
            clip_norm=float(privacy.round_clip_norm),
            noise_multiplier=float(privacy.round_noise_multiplier),
            num_clients=privacy.round_clients,
            delta=delta,
        )
    else:
        dp = update.RoundDPConfig.for_epsilon(
            epsilon=float(privacy.round_target_epsilon),
            clip_norm=float(privacy.round_clip_norm),
            num_clients=privacy.round_clients,
            delta=delta,
        )
    budget = update.RoundBudget(
        path=config.state_dir / ROUND_BUDGET_FILE, epsilon_limit=float(privacy.round_budget), delta=delta
    )
    budget.check(dp.noise_multiplier)
    return dp, budget


def _join(config: AgentConfig) -> dict[str, Any]:
    """Job ``join``: take part in one secure-aggregation round with a freshly personalized ``v``.

    The device must be enrolled (``fedfer-agent enroll --state <state_dir>/federation``). Within the round the
    central ``v`` of the round's base version is fetched, personalized on the cached sessions, and only the
    masked difference leaves the device: weighted by the number of clips used, or, with
    ``privacy.round_dp``, clipped in L2, with this device's share of the Gaussian noise and weight 1
    (:func:`agent.learning.update.round_contribution`). A device whose round budget is spent is refused
    before it contacts the aggregator.
    """
    if not config.federation.server:
        raise ValidationError("federation.server is not configured: this device does not federate")
    round_dp, round_budget = _round_privacy(config)
    client_module = _component("agent.federation.client", "the federation client")
    state_module = _component("agent.federation.state", "the federation client")
    try:
        state = state_module.DeviceState.load(config.state_dir / FEDERATION_DIR)
    except FedferError as exc:
        raise ComponentUnavailableError(
            f"{exc}; enroll with `fedfer-agent enroll --state {config.state_dir / FEDERATION_DIR} ...`"
        ) from None
    if state.target != config.federation.server:
        raise ValidationError("the device is enrolled with another aggregator than federation.server")
    try:
        ca_matches = Path(config.federation.ca).read_bytes().strip() == state.ca_pem().strip()
    except OSError:
        raise ValidationError("federation.ca cannot be read") from None
    if not ca_matches:
        raise ValidationError("the enrollment pinned a different CA than federation.ca")
    report: dict[str, Any] = {}
    holder: dict[str, Any] = {}

    async def update_fn(base_version: str, dim: int) -> tuple[np.ndarray, int]:
        central = await holder["client"].fetch_model(base_version)
        base = {k: np.asarray(v, dtype=np.float32) for k, v in central.arrays.items()}
        _save_model(config, "central", base, {"version": central.version})
        personal, summary = await _in_daemon_thread(_personalize_from, config, base)
        if set(personal) != set(base) or summary["selected"] < 1:
            raise ValidationError("no cached clip passed the confidence threshold; nothing to contribute")
        if sum(a.size for a in base.values()) != dim:
            raise ValidationError("the personalized model does not match the round's model")
        update_module = _component("agent.learning.update", "round updates")
        update, weight, privacy_report = update_module.round_contribution(
            base,
            personal,
            order=list(base),
            examples=int(summary["selected"]),
            dp=round_dp,
            budget=round_budget,
        )
        report.update(summary, **privacy_report)
        return update, int(weight)

    async def go() -> Any:
        async with client_module.FederationClient(state=state) as opened:
            holder["client"] = opened
            outcome = await opened.join_round(update_fn, timeout_s=config.federation.round_timeout_s)
            # What this device put on the wire for the round (the later download is not part of it).
            counter = opened.counter
            report.update(
                wire_bytes=counter.total, wire_payload_bytes=counter.payload, wire_calls=counter.calls
            )
            if outcome.status == "published" and outcome.model_version:
                # Keep the newly published central v so the next `personalize` starts from it.
                latest = await opened.fetch_model(outcome.model_version)
                arrays = {k: np.asarray(v, dtype=np.float32) for k, v in latest.arrays.items()}
                _save_model(config, "central", arrays, {"version": latest.version})
                report["central_saved"] = str(latest.version)
            return outcome

    outcome = _run_cancellable(go())
    return {
        "round_id": int(outcome.round_id),
        "status": str(outcome.status),
        "model_version": str(outcome.model_version),
        "base_version": str(outcome.base_version),
        **report,
    }


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a daemon thread and await its result.

    ``asyncio.to_thread`` would use the default executor, whose threads the interpreter joins at exit: a
    long personalization would then hold a stopping learner past its drain bound.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def work() -> None:
        try:
            value = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine, which re-raises it
            with contextlib.suppress(RuntimeError):  # the loop is gone: the job was cancelled
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, None)

    thread = threading.Thread(target=work, name="job-compute", daemon=True)
    with _running_lock:
        _computing.add(thread)
    thread.start()
    try:
        return await future
    finally:
        if not thread.is_alive():
            with _running_lock:
                _computing.discard(thread)


class JobCancelledError(FedferError):
    """A job was cancelled because the agent is stopping (nothing was sent or saved half-way)."""


_cancel = threading.Event()
_running: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = {}
_running_lock = threading.Lock()
_computing: set[threading.Thread] = set()


def computations_running() -> bool:
    """Whether a job's computation is still running (possibly abandoned by a cancelled job)."""
    with _running_lock:
        return any(t.is_alive() for t in _computing)


def _run_cancellable(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)``, cancelled at once (``JobCancelledError``) by :func:`cancel_jobs`."""

    async def main() -> T:
        task = asyncio.ensure_future(coro)
        with _running_lock:
            _running["job"] = (asyncio.get_running_loop(), task)
        if _cancel.is_set():
            task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            raise JobCancelledError("the job was cancelled: the agent is stopping") from None
        finally:
            with _running_lock:
                _running.pop("job", None)

    return asyncio.run(main())


def cancel_jobs() -> None:
    """Cancel the running job (the agent is stopping): its network calls end and its channel closes."""
    _cancel.set()
    with _running_lock:
        entry = _running.get("job")
    if entry is not None:
        loop, task = entry
        with contextlib.suppress(RuntimeError):  # the loop already finished
            loop.call_soon_threadsafe(task.cancel)


#: Control-plane jobs the learner worker runs, by name.
JOBS: dict[str, Callable[[AgentConfig], dict[str, Any]]] = {
    "join": _join,
    "personalize": _personalize,
}
