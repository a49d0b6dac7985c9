"""The agent's configuration: one TOML file, a typed and validated schema, secure defaults.

Every section is a frozen dataclass built with keyword-only arguments and checked in ``__post_init__``;
unknown sections and keys are rejected, and every error names the offending key, e.g.
``config error: capture.fps must be a number in (0, 60]``.

Files and the environment are read only by entry points: :func:`load_config` reads the file it is given,
and :func:`apply_path_overrides` takes the environment mapping the entry point passes in. Only *paths* may
be overridden from the environment (``FEDFER_STATE_DIR``, ``FEDFER_ASSETS``; ``FEDFER_CONFIG`` names the
file).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfer.security.errors import ValidationError

__all__ = [
    "ENV_ASSETS",
    "ENV_CONFIG",
    "ENV_STATE_DIR",
    "AgentConfig",
    "AgentSection",
    "CacheSection",
    "CaptureSection",
    "ConfigError",
    "DaemonSection",
    "FederationSection",
    "LearningSection",
    "PrivacySection",
    "VisionSection",
    "apply_path_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_config",
]

_log = logging.getLogger(__name__)

ENV_CONFIG = "FEDFER_CONFIG"
ENV_STATE_DIR = "FEDFER_STATE_DIR"
ENV_ASSETS = "FEDFER_ASSETS"

# A config file is a few hundred bytes; anything far larger is a mistake (or an attack on the parser).
_MAX_CONFIG_BYTES = 256 * 1024


class ConfigError(ValidationError):
    """The configuration file or a value in it is invalid; the message names the key."""

    def __init__(self, message: str) -> None:
        super().__init__(f"config error: {message}")


# --------------------------------------------------------------------------------------------- checkers
# Each checker returns None when the value is acceptable and otherwise a phrase completing
# "<section>.<key> ..." (for example "must be a number in (0, 60]").


def _number(
    lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> Callable[[Any], str | None]:
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    hi_text = "inf" if math.isinf(hi) else f"{hi:g}"
    phrase = f"must be a number in {left}{lo:g}, {hi_text}{right}"

    def check(value: Any) -> str | None:
        if type(value) not in (int, float) or not math.isfinite(value):
            return phrase
        below = value <= lo if lo_open else value < lo
        above = value >= hi if hi_open else value > hi
        return phrase if below or above else None

    return check


def _integer(lo: int, hi: int) -> Callable[[Any], str | None]:
    phrase = f"must be an integer in [{lo}, {hi}]"

    def check(value: Any) -> str | None:
        # type() rather than isinstance(): a TOML boolean is not an integer.
        if type(value) is not int or not lo <= value <= hi:
            return phrase
        return None

    return check


def _boolean(value: Any) -> str | None:
    return None if type(value) is bool else "must be true or false"


def _choice(*options: Any) -> Callable[[Any], str | None]:
    phrase = "must be one of " + ", ".join(json.dumps(o) for o in options)

    def check(value: Any) -> str | None:
        if type(value) not in {type(o) for o in options} or value not in options:
            return phrase
        return None

    return check


def _text(*, allow_empty: bool = False, max_len: int = 4096) -> Callable[[Any], str | None]:
    phrase = "must be a string" if allow_empty else "must be a non-empty string"

    def check(value: Any) -> str | None:
        if type(value) is not str or (not value and not allow_empty) or len(value) > max_len:
            return phrase
        if "\x00" in value:
            return "must not contain NUL characters"
        return None

    return check


def _regex(value: Any) -> str | None:
    phrase = (
        "must be a regular expression (Python re syntax) of at most 256 characters, with at most one group"
    )
    if type(value) is not str or len(value) > 256:
        return phrase
    try:
        groups = re.compile(value).groups
    except re.error as exc:
        return f"is not a valid regular expression ({exc})"
    return phrase if groups > 1 else None


def _sha256(value: Any) -> str | None:
    phrase = "must be a 64-character lowercase hex SHA-256 (the file is always verified; empty is refused)"
    if type(value) is not str or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        return phrase
    return None


def _download_url(value: Any) -> str | None:
    # The downloader enforces the rest (plain http only to a loopback host).
    if type(value) is not str or not value.startswith(("https://", "http://", "file://")):
        return "must be an https:// (file://, or http:// to a loopback host) URL"
    return None


def _opt(check: Callable[[Any], str | None], *, default: Any, path: bool = False) -> Any:
    """A dataclass field carrying its checker (and whether it is a path) in its metadata."""
    return field(default=default, metadata={"check": check, "path": path})


def _validate(section: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        problem = f.metadata["check"](getattr(obj, f.name))
        if problem is not None:
            raise ConfigError(f"{section}.{f.name} {problem}")


# --------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True, kw_only=True)
class AgentSection:
    """``[agent]``: where the agent keeps its state and how it logs.

    Attributes:
        state_dir: private state directory (0700); empty means "the entry point decides"
            (``FEDFER_STATE_DIR``, else ``$XDG_STATE_HOME/fedfer``, else ``~/.local/state/fedfer``).
        assets_dir: folder holding model files named by relative paths below (``FEDFER_ASSETS``).
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        log_file: JSON-lines log file; empty means standard error (the journal under systemd).
    """

    state_dir: str = _opt(_text(allow_empty=True), default="", path=True)
    assets_dir: str = _opt(_text(allow_empty=True), default="", path=True)
    log_level: str = _opt(_choice("debug", "info", "warning", "error"), default="info")
    log_file: str = _opt(_text(allow_empty=True), default="", path=True)

    def __post_init__(self) -> None:
        _validate("agent", self)


@dataclass(frozen=True, kw_only=True)
class CaptureSection:
    """``[capture]``: the video source.

    Attributes:
        source: ``camera:N`` (device index), a video file, an image file, a folder of video files and/or still
            images (``.jpg .jpeg .png .bmp``; read in name order, see :mod:`fedfer.agent.capture.sources`), or
            an ``rtsp://``/``http(s)://`` stream URL. A file in a folder that cannot be read is skipped and
            listed by ``fedfer-agent status``.
        fps: frames per second sampled from the source, in (0, 60]; a folder's images are frames at this
            rate (one image each ``1/fps`` seconds).
        realtime: pace file sources at ``fps`` in wall-clock time (a camera is always real time).
        loop: start a file source again when it ends. Without it a file source is finite: nothing is
            dropped and each file is cached exactly once (see :mod:`fedfer.agent.capture.ledger`); a looping
            file is live.
        max_width: frames wider than this are scaled down before they leave the capture process.
        image_session_key: which images of a folder form one session: a regular expression searched in each
            image's file name; its first group (or, without a group, the whole match) is the image's session
            key, and consecutive images (in name order) with the same key are one session (at most 1,000
            images; a longer run goes on in a new session). A name it does not match has the empty key.
            Empty (the default): the folder's images are one session. ``^.{5}``: one session per 5-character
            name prefix. Vision still cuts a session after ``vision.session_gap_s`` without a face.
    """

    source: str = _opt(_text(), default="camera:0")
    fps: float = _opt(_number(0, 60, lo_open=True), default=5.0)
    realtime: bool = _opt(_boolean, default=True)
    loop: bool = _opt(_boolean, default=False)
    max_width: int = _opt(_integer(64, 4096), default=640)
    image_session_key: str = _opt(_regex, default="")

    def __post_init__(self) -> None:
        _validate("capture", self)
        if self.source.startswith("camera:") and not self.source[len("camera:") :].isdigit():
            raise ConfigError("capture.source camera index must be a non-negative integer, e.g. camera:0")


@dataclass(frozen=True, kw_only=True)
class VisionSection:
    """``[vision]``: face detection and features.

    Attributes:
        detector_model: MediaPipe face detector ``.tflite`` (relative paths resolve against
            ``agent.assets_dir``).
        detector_sha256: pinned SHA-256 of the detector file (required: the file is always verified).
        detector_url: where a missing detector file is downloaded from (into the agent's model folder,
            verified against ``detector_sha256``); default MediaPipe's own URL for the pinned file.
        ifer_model: an IFER export (``.json`` manifest of f + g); empty: ``feature_weights`` + ``ifer_head``.
        feature_weights: MobileNetV2 weights for f (``.tflite`` or ``.pth``); empty: the TFLite model in the
            assets folder (used only when ``ifer_model`` is empty).
        ifer_head: state dict of g for ``feature_weights`` (empty: an untrained head, for timing only).
        emulate_tflite_quantization: with ``.tflite`` feature weights, replay the TFLite graph's uint8
            activation rounding (top-1 agreement with the TFLite interpreter 93% instead of 76%, about 10%
            slower; see docs/vision.md). Off: the plain float network.
        min_score: minimum detector confidence, in (0, 1].
        margin: fraction of the face box added on each side before cropping, in [0, 1].
        session_gap_s: a session ends after this many seconds without a face.
    """

    detector_model: str = _opt(
        _text(), default="models/mediapipe/face_detection_short_range.tflite", path=True
    )
    detector_sha256: str = _opt(
        _sha256, default="bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"
    )
    detector_url: str = _opt(
        _download_url,
        default="https://storage.googleapis.com/mediapipe-assets/face_detection_short_range.tflite"
        "?generation=1677044301978921",
    )
    ifer_model: str = _opt(_text(allow_empty=True), default="", path=True)
    feature_weights: str = _opt(_text(allow_empty=True), default="", path=True)
    ifer_head: str = _opt(_text(allow_empty=True), default="", path=True)
    emulate_tflite_quantization: bool = _opt(_boolean, default=False)
    min_score: float = _opt(_number(0, 1, lo_open=True), default=0.5)
    margin: float = _opt(_number(0, 1), default=0.2)
    session_gap_s: float = _opt(_number(0, 3600, lo_open=True), default=2.0)

    def __post_init__(self) -> None:
        _validate("vision", self)


@dataclass(frozen=True, kw_only=True)
class CacheSection:
    """``[cache]``: the encrypted feature cache.

    Attributes:
        retention_days: sessions older than this are deleted (and their keys destroyed).
        max_bytes: the cache's size limit; the oldest sessions go first.
        key_store: ``file`` (a 0600 key-encryption-key file in the state directory), ``keyring`` (the OS
            keyring), or ``auto``: the OS keyring for a new cache when the optional ``keyring`` package has a
            working backend, else the file (a cache that already has a key file keeps it).
    """

    retention_days: int = _opt(_integer(1, 3650), default=30)
    max_bytes: int = _opt(_integer(1 << 20, 1 << 40), default=2 << 30)
    key_store: str = _opt(_choice("file", "keyring", "auto"), default="auto")

    def __post_init__(self) -> None:
        _validate("cache", self)


@dataclass(frozen=True, kw_only=True)
class LearningSection:
    """``[learning]``: unsupervised personalization of ``v`` (Salman & Busso, ICMI 2022).

    Attributes:
        num_classes: 4 or 6 (the class set shared by IFER and VFER).
        confidence_threshold: clips whose mean IFER confidence is lower are not used.
        max_per_class: at most this many clips per pseudo label (P).
        epochs: fine-tuning epochs.
        lr: Adam learning rate.
        min_sessions: personalization waits for at least this many cached sessions.
        allow_untrained_ifer: run ``personalize``/``join`` even when the IFER head is untrained
            (``vision.ifer_model`` and ``vision.ifer_head`` empty); its pseudo labels are then meaningless, so
            this is for experiments only and off by default.
    """

    num_classes: int = _opt(_choice(4, 6), default=6)
    confidence_threshold: float = _opt(_number(0, 1, hi_open=True), default=0.5)
    max_per_class: int = _opt(_integer(1, 10_000), default=50)
    epochs: int = _opt(_integer(1, 100), default=2)
    lr: float = _opt(_number(0, 1, lo_open=True), default=1e-3)
    min_sessions: int = _opt(_integer(1, 100_000), default=1)
    allow_untrained_ifer: bool = _opt(_boolean, default=False)

    def __post_init__(self) -> None:
        _validate("learning", self)


@dataclass(frozen=True, kw_only=True)
class PrivacySection:
    """``[privacy]``: differential privacy of the local training (on by default) and of round updates.

    Attributes:
        dp: train with DP-SGD (Opacus).
        target_epsilon: epsilon spent by one personalization run (0: give ``noise_multiplier`` instead).
        noise_multiplier: DP-SGD noise multiplier instead of a target epsilon (0: use ``target_epsilon``);
            exactly one of the two is set when ``dp`` is on.
        delta: the DP delta, in (0, 1e-2] (local training and rounds alike).
        budget: total epsilon this device may spend; training is refused once it is spent.
        max_grad_norm: per-sample gradient clipping bound.
        round_dp: user-level DP for federated rounds: clip Δv in L2, add this device's share of the
            Gaussian noise, send it with weight 1 (see :mod:`fedfer.agent.learning.update`).
        round_clip_norm: L2 bound on a device's whole Δv.
        round_target_epsilon: epsilon of one round (0: give ``round_noise_multiplier`` instead).
        round_noise_multiplier: noise multiplier of the aggregate (0: use ``round_target_epsilon``).
        round_clients: expected number of devices per round; each adds ``1/round_clients`` of the noise
            variance. Set it to the round's minimum (1 = every device adds all of it, the safe choice).
        round_budget: total user-level epsilon this device may spend on rounds; joining is refused beyond it.
    """

    dp: bool = _opt(_boolean, default=True)
    target_epsilon: float = _opt(_number(0, 100), default=4.0)
    noise_multiplier: float = _opt(_number(0, 1000), default=0.0)
    delta: float = _opt(_number(0, 1e-2, lo_open=True), default=1e-5)
    budget: float = _opt(_number(0, 1000, lo_open=True), default=16.0)
    max_grad_norm: float = _opt(_number(0, 1000, lo_open=True), default=1.0)
    round_dp: bool = _opt(_boolean, default=False)
    round_clip_norm: float = _opt(_number(0, 1000, lo_open=True), default=1.0)
    round_target_epsilon: float = _opt(_number(0, 100), default=1.0)
    round_noise_multiplier: float = _opt(_number(0, 1000), default=0.0)
    round_clients: int = _opt(_integer(1, 1_000_000), default=1)
    round_budget: float = _opt(_number(0, 1000, lo_open=True), default=8.0)

    def __post_init__(self) -> None:
        _validate("privacy", self)
        _one_of("target_epsilon", self.target_epsilon, "noise_multiplier", self.noise_multiplier, self.dp)
        if self.budget < self.target_epsilon:
            raise ConfigError("privacy.budget must be at least privacy.target_epsilon")
        _one_of(
            "round_target_epsilon",
            self.round_target_epsilon,
            "round_noise_multiplier",
            self.round_noise_multiplier,
            self.round_dp,
        )
        if self.round_budget < self.round_target_epsilon:
            raise ConfigError("privacy.round_budget must be at least privacy.round_target_epsilon")
        if self.round_dp and self.round_noise_multiplier > 0:
            from fedfer.security.dp import gaussian_epsilon

            if gaussian_epsilon(self.round_noise_multiplier, 1, float(self.delta)) > self.round_budget:
                raise ConfigError(
                    "privacy.round_budget cannot pay for one round at privacy.round_noise_multiplier"
                )
        if not self.dp:
            _log.warning("differential privacy is OFF: local training gives no formal privacy guarantee")


def _one_of(a: str, a_value: float, b: str, b_value: float, needed: bool) -> None:
    """Two ``[privacy]`` settings that exclude each other (0 = unset): never both, one when ``needed``."""
    if a_value > 0 and b_value > 0:
        raise ConfigError(f"privacy.{a} and privacy.{b} are mutually exclusive (set {a} = 0 to use {b})")
    if needed and a_value <= 0 and b_value <= 0:
        raise ConfigError(f"privacy.{a} or privacy.{b} must be positive")


@dataclass(frozen=True, kw_only=True)
class FederationSection:
    """``[federation]``: the aggregator this device joins.

    Attributes:
        server: ``host:port`` of the aggregator's federation (mutual-TLS) port; empty means the device does
            not federate. ``join`` refuses an enrollment made with another aggregator.
        ca: CA certificate (PEM) that signs the aggregator's TLS certificate; ``join`` refuses an enrollment
            that pinned a different CA.
        round_timeout_s: give up a round after this many seconds.
    """

    server: str = _opt(_text(allow_empty=True, max_len=512), default="")
    ca: str = _opt(_text(allow_empty=True), default="", path=True)
    round_timeout_s: float = _opt(_number(1, 86_400), default=600.0)

    def __post_init__(self) -> None:
        _validate("federation", self)
        if self.server:
            host, sep, port = self.server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError("federation.server must look like host:port")
            if not self.ca:
                raise ConfigError("federation.ca must be set when federation.server is set (TLS is required)")


@dataclass(frozen=True, kw_only=True)
class DaemonSection:
    """``[daemon]``: the supervisor and its workers.

    Attributes:
        drain_timeout_s: SIGTERM drains the workers and exits within this bound.
        heartbeat_interval_s: how often each worker reports.
        heartbeat_timeout_s: a worker silent this long is killed and restarted.
        start_timeout_s: how long a new worker may take to send its first heartbeat.
        restart_backoff_s: first restart delay after a crash; it doubles per consecutive crash.
        restart_backoff_max_s: the delay's ceiling.
        crash_loop_limit: after this many crashes within ``crash_loop_window_s`` a worker is given up.
        crash_loop_window_s: the crash-loop window; a worker up this long counts as healthy again.
        queue_hwm: bound (messages) of each queue between workers; beyond it a live source (camera, stream,
            looping file) drops frames and records (counted) while a file source read once waits for room.
        control_max_bytes: largest accepted control request.
    """

    drain_timeout_s: float = _opt(_number(0.5, 300), default=10.0)
    heartbeat_interval_s: float = _opt(_number(0.05, 60), default=1.0)
    heartbeat_timeout_s: float = _opt(_number(0.2, 600), default=10.0)
    start_timeout_s: float = _opt(_number(1, 600), default=60.0)
    restart_backoff_s: float = _opt(_number(0.01, 60), default=0.5)
    restart_backoff_max_s: float = _opt(_number(0.01, 3600), default=30.0)
    crash_loop_limit: int = _opt(_integer(1, 1000), default=5)
    crash_loop_window_s: float = _opt(_number(1, 86_400), default=60.0)
    queue_hwm: int = _opt(_integer(1, 100_000), default=64)
    control_max_bytes: int = _opt(_integer(256, 1 << 20), default=64 * 1024)

    def __post_init__(self) -> None:
        _validate("daemon", self)
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ConfigError("daemon.heartbeat_timeout_s must exceed twice daemon.heartbeat_interval_s")
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise ConfigError("daemon.restart_backoff_max_s must be at least daemon.restart_backoff_s")


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """The whole configuration: one attribute per TOML section, each with secure defaults."""

    agent: AgentSection = field(default_factory=AgentSection)
    capture: CaptureSection = field(default_factory=CaptureSection)
    vision: VisionSection = field(default_factory=VisionSection)
    cache: CacheSection = field(default_factory=CacheSection)
    learning: LearningSection = field(default_factory=LearningSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    federation: FederationSection = field(default_factory=FederationSection)
    daemon: DaemonSection = field(default_factory=DaemonSection)

    @property
    def state_dir(self) -> Path:
        """The resolved state directory (:func:`apply_path_overrides` must have filled it in)."""
        if not self.agent.state_dir:
            raise ConfigError("agent.state_dir is not set (set it, or FEDFER_STATE_DIR)")
        return Path(self.agent.state_dir)

    def model_path(self, value: str) -> Path:
        """Resolve a model path from the config: absolute as is, relative against ``agent.assets_dir``."""
        path = Path(value)
        if path.is_absolute() or not self.agent.assets_dir:
            return path
        return Path(self.agent.assets_dir) / path


_SECTION_TYPES: dict[str, type[Any]] = {
    "agent": AgentSection,
    "capture": CaptureSection,
    "vision": VisionSection,
    "cache": CacheSection,
    "learning": LearningSection,
    "privacy": PrivacySection,
    "federation": FederationSection,
    "daemon": DaemonSection,
}


def config_from_dict(data: Mapping[str, Any]) -> AgentConfig:
    """Build and validate an :class:`AgentConfig` from parsed TOML (or JSON) data.

    Raises:
        ConfigError: an unknown section or key, a wrong type or an out-of-range value (the key is named).
    """
    if not isinstance(data, Mapping):
        raise ConfigError("the top level must be a table")
    sections: dict[str, Any] = {}
    for name, table in data.items():
        cls = _SECTION_TYPES.get(name)
        if cls is None:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(sorted(_SECTION_TYPES))})")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name} must be a table")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in table:
            if key not in known:
                raise ConfigError(f"unknown key {name}.{key}")
        sections[name] = cls(**dict(table))
    return AgentConfig(**sections)


def config_to_dict(config: AgentConfig) -> dict[str, dict[str, Any]]:
    """The configuration as plain data (``config_from_dict(config_to_dict(c)) == c``)."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in _SECTION_TYPES}


def parse_config(text: str) -> AgentConfig:
    """Parse TOML text into a validated :class:`AgentConfig`.

    Raises:
        ConfigError: the text is not valid TOML or fails validation.
    """
    if len(text) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"the file is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML ({exc})") from None
    return config_from_dict(data)


def load_config(path: Path) -> AgentConfig:
    """Read and validate one TOML configuration file (no environment overrides applied).

    Raises:
        ConfigError: the file cannot be read or is invalid.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    return parse_config(text)


def apply_path_overrides(config: AgentConfig, environ: Mapping[str, str]) -> AgentConfig:
    """Apply the environment's path overrides and fill in the default state directory.

    Only paths may come from the environment: ``FEDFER_STATE_DIR`` and ``FEDFER_ASSETS``. Without either,
    the state directory defaults to ``$XDG_STATE_HOME/fedfer`` or ``~/.local/state/fedfer``. Relative
    paths are made absolute against the current directory, so workers see the same files.

    Args:
        config: a validated configuration.
        environ: the environment the entry point passes in (usually ``os.environ``).

    Raises:
        ConfigError: an override is empty or holds a NUL character, or no state directory can be derived.
    """
    agent = config.agent
    state_dir = environ.get(ENV_STATE_DIR, agent.state_dir)
    assets_dir = environ.get(ENV_ASSETS, agent.assets_dir)
    for env_name, value in ((ENV_STATE_DIR, state_dir), (ENV_ASSETS, assets_dir)):
        if env_name in environ and (not value or "\x00" in value):
            raise ConfigError(f"environment variable {env_name} must be a non-empty path")
    if not state_dir:
        base = environ.get("XDG_STATE_HOME") or (
            str(Path(environ["HOME"]) / ".local" / "state") if environ.get("HOME") else ""
        )
        if not base:
            raise ConfigError("agent.state_dir is not set and neither FEDFER_STATE_DIR nor HOME is")
        state_dir = str(Path(base) / "fedfer")
    new_agent = dataclasses.replace(
        agent,
        state_dir=str(Path(state_dir).absolute()),
        assets_dir=str(Path(assets_dir).absolute()) if assets_dir else "",
        log_file=str(Path(agent.log_file).absolute()) if agent.log_file else "",
    )
    return dataclasses.replace(config, agent=new_agent)
