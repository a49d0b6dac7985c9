"""``python -m fedfer.bench.demo`` (``make demo``): a real local federation on one machine, with no setup.

The demo builds everything it needs under ``--workdir`` and runs it as separate processes:

1. the IFER head ``g``: an IFER export found in the model cache (``fedfer-agent train-ifer`` writes one
   there), else a quick ``g`` trained on a small FER2013 subset (f frozen, bounded to about a minute) and
   cached by content hash, so the next run reuses it;
2. an aggregator deployment (``fedfer-aggregator init``: SQLite, a self-made CA), an initial central ``v``
   (fixed-seed initialization) published as version 1, and ``fedfer-aggregator serve`` for N rounds;
3. N agents, each the real daemon ``fedfer-agent run`` with its own config file and state directory, enrolled
   over TLS with a one-time token and fed a video source (``--source``): its share of the real CREMA-D
   clips in ``../shared`` by default, of the video files given, or a camera that each agent watches in turn;
   capture → MediaPipe faces → MobileNetV2 ``f`` → IFER ``g`` → encrypted cache;
4. the rounds: every agent is told to ``join`` through its control plane; its learner personalizes ``v`` on
   pseudo labels from IFER and sends only the masked update; the aggregator publishes a new central ``v``;
5. a summary: pseudo labels per agent, central versions and update norms, accuracy of ``v`` on each agent's
   clips before/after (against its pseudo labels and the CREMA-D crowd's face-only votes), bytes each device
   sent per round (measured as the aggregator stored them), epsilon with ``--dp``, and where the state lives.

The accuracy figures are computed at the end by this process from each device's own cache (as the device
itself would); nothing of it leaves a device. Every child process is stopped on exit, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import numpy as np

from fedfer.agent.capture.video import VIDEO_SUFFIXES
from fedfer.agent.files import MOBILENET_TFLITE, assets_dir
from fedfer.security.errors import FedferError, ValidationError

__all__ = [
    "Children",
    "DemoConfig",
    "DemoError",
    "DemoSource",
    "ensure_ifer",
    "format_summary",
    "initial_v",
    "main",
    "parse_source",
    "run_demo",
    "split_clips",
]

NUM_CLASSES = 6
CLIPS_DIR = Path("data/crema-d-sample")
FER_DIR = Path("data/fer2013")
_BIN = Path(sys.executable).parent
_DEMO_IFER_PREFIX = "demo-ifer-"
# A cached IFER export is used only if it beats what the quick g reaches (dev macro F1 ~0.33).
_MIN_CACHED_MACRO_F1 = 0.35
# One masked-input message is the packed vector plus a small envelope (ids, round, lengths).
_MASKED_ENVELOPE_MAX = 256
# Request ids, round ids and chunk headers of one round's stage messages plus its status polls and check-in.
_REQUEST_ENVELOPES_MAX = 4096


class DemoError(FedferError):
    """The demo could not complete (a component failed, timed out, or the result is not what it must be)."""


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo runs.

    Attributes:
        workdir: folder for every piece of state (aggregator deployment, agents' state, logs).
        assets: the shared assets folder (models and data, read only).
        agents: number of agent processes (>= 3: the secure-aggregation threshold needs them).
        rounds: secure-aggregation rounds to run.
        fps: frames sampled per second of video.
        dp: personalize with DP-SGD (Opacus) and report epsilon.
        target_epsilon: epsilon each round's personalization may spend when ``dp``.
        ifer: an IFER export (``.json`` manifest) to use instead of looking in the cache.
        ifer_per_class: FER2013 training images per class for the quick ``g`` (when none is cached).
        timeout_s: give up after this many seconds in total.
        source: the video the agents watch (:func:`parse_source`): ``camera:N``, or video files and folders
            separated by commas; empty: the CREMA-D clips in the assets folder.
        camera_s: with a camera, seconds each agent watches it (one agent at a time).
    """

    workdir: Path
    assets: Path
    agents: int = 3
    rounds: int = 2
    fps: float = 8.0
    dp: bool = False
    target_epsilon: float = 4.0
    ifer: Path | None = None
    ifer_per_class: int = 150
    timeout_s: float = 900.0
    source: str = ""
    camera_s: float = 20.0

    def __post_init__(self) -> None:
        if type(self.agents) is not int or not 3 <= self.agents <= 16:
            raise ValidationError("agents must be an int in [3, 16]")
        if type(self.rounds) is not int or not 1 <= self.rounds <= 10:
            raise ValidationError("rounds must be an int in [1, 10]")
        if type(self.fps) not in (int, float) or not 0 < self.fps <= 30:
            raise ValidationError("fps must be a number in (0, 30]")
        if type(self.target_epsilon) not in (int, float) or not 0 < self.target_epsilon <= 50:
            raise ValidationError("target_epsilon must be a number in (0, 50]")
        if type(self.ifer_per_class) is not int or not 10 <= self.ifer_per_class <= 5000:
            raise ValidationError("ifer_per_class must be an int in [10, 5000]")
        if type(self.timeout_s) not in (int, float) or not 30 <= self.timeout_s <= 7200:
            raise ValidationError("timeout_s must be a number in [30, 7200]")
        if not (self.assets / "models").is_dir():
            raise ValidationError(
                f"assets folder {self.assets} has no models/ (set --assets or FEDFER_ASSETS)"
            )
        if type(self.camera_s) not in (int, float) or not 3 <= self.camera_s <= 600:
            raise ValidationError("camera_s must be a number in [3, 600]")
        parse_source(self.source, self.assets)
        # Each agent's sockets live in <workdir>/agentNN/state/run/ (AF_UNIX paths are short).
        if len(os.fsencode(self.workdir.absolute() / "agent00" / "state" / "run" / "workers.ipc")) > 100:
            raise ValidationError(
                "--workdir path is too long for the agents' local sockets; use a shorter one"
            )
        if self.ifer is not None and not self.ifer.is_file():
            raise ValidationError("--ifer must name an IFER export manifest (.json)")


# ---------------------------------------------------------------------------------------------- processes


class Children:
    """The demo's child processes; :meth:`stop_all` leaves none behind."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def spawn(
        self, name: str, argv: Sequence[str], *, log: Path, env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout/stderr appended to ``log``."""
        fh = log.open("ab")
        proc = subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=fh,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            preexec_fn=_die_with_parent,  # the demo spawns from its only thread
        )
        self._procs.append((name, proc, fh))
        return proc

    @property
    def pids(self) -> list[int]:
        """Pids of every child started (running or not)."""
        return [p.pid for _, p, _ in self._procs]

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0, *, signalled: bool = False) -> int:
        """SIGTERM ``proc`` unless ``signalled`` already, wait (SIGKILL after ``timeout``); its exit status.

        SIGTERM is sent once only: a second one can land while the child's interpreter is shutting down
        (handlers reset to the default) and turn a clean exit into death by signal.
        """
        if proc.poll() is None:
            if not signalled:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return int(proc.returncode)

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM every child still running, wait for all (SIGKILL after ``timeout``); Ctrl-C is held off."""
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for _, proc, _ in reversed(self._procs):
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for _, proc, fh in reversed(self._procs):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    self.stop(proc, timeout=max(0.1, deadline - time.monotonic()), signalled=True)
                fh.close()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _die_with_parent() -> None:
    """Run in each child before exec: Linux SIGTERMs it if the demo dies, even by ``kill -9`` (no orphans)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _child_env(assets: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDFER_") or k.startswith("FEDFER_CACHE")}
    env["FEDFER_ASSETS"] = str(assets)
    env["PYTHONUNBUFFERED"] = "1"
    # Two cores shared by many processes: one thread each keeps them from fighting.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_cli(
    argv: Sequence[str], *, env: Mapping[str, str], timeout: float = 120.0, stdin: str | None = None
) -> str:
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, env=dict(env)
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise DemoError(f"{Path(argv[0]).name} {argv[1]} failed ({proc.returncode}): {' | '.join(tail)}")
    return proc.stdout


# ------------------------------------------------------------------------------------------------- inputs


def split_clips(clips: Sequence[Path], agents: int) -> list[list[Path]]:
    """Deal the clips to ``agents`` devices round-robin (with fewer clips than agents, each sees them all).

    Raises:
        ValidationError: no clips or no agents.
    """
    if not clips or agents < 1:
        raise ValidationError("need at least one clip and one agent")
    ordered = sorted(clips)
    if len(ordered) < agents:
        return [ordered[i:] + ordered[:i] for i in range(agents)]
    return [ordered[i::agents] for i in range(agents)]


@dataclass(frozen=True, slots=True)
class DemoSource:
    """What the agents watch: a camera (each agent in turn) or video files (dealt to the agents)."""

    camera: int | None = None
    clips: tuple[Path, ...] = ()


def _videos_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def parse_source(text: str, assets: Path) -> DemoSource:
    """Resolve ``--source``: ``camera:N``, or ``PATH[,PATH...]`` (video files and folders of them).

    Empty: the CREMA-D sample clips in ``assets`` (``data/crema-d-sample``), when they are there.

    Raises:
        ValidationError: a malformed camera index, a path that does not exist or is not a video, no video at
            all, or no ``--source`` and no sample clips (the message names the option).
    """
    text = text.strip()
    if not text:
        folder = assets / CLIPS_DIR
        clips = _videos_in(folder) if folder.is_dir() else []
        if not clips:
            raise ValidationError(
                f"no video source: the CREMA-D sample clips are not in the assets folder ({folder}); "
                "pass --source camera:N or --source PATH[,PATH...] (video files or folders)"
            )
        return DemoSource(clips=tuple(clips))
    if text.startswith("camera:"):
        index = text[len("camera:") :]
        if not index.isdigit():
            raise ValidationError("--source camera:N needs a camera index, e.g. camera:0")
        return DemoSource(camera=int(index))
    found: list[Path] = []
    for item in (part.strip() for part in text.split(",")):
        path = Path(item).expanduser().absolute()
        if not item or not path.exists():
            raise ValidationError(f"--source: {item or '(empty)'} does not exist")
        if path.is_dir():
            videos = _videos_in(path)
            if not videos:
                raise ValidationError(
                    f"--source: folder {item} holds no video files ({', '.join(sorted(VIDEO_SUFFIXES))})"
                )
            found.extend(videos)
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            found.append(path)
        else:
            raise ValidationError(
                f"--source: {item} is not a video file ({', '.join(sorted(VIDEO_SUFFIXES))})"
            )
    return DemoSource(clips=tuple(dict.fromkeys(found)))


def _crowd_labels(assets: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Acted emotion and the crowd's face-only plurality vote (class index or None) for each clip name."""
    from fedfer.agent.records import CLASS_SETS
    from fedfer.agent.training.data import crema_label, read_crema_summary

    summary = assets / CLIPS_DIR / "summaryTable.csv"
    if not names or not summary.is_file():
        return {}
    table = read_crema_summary(summary)
    classes = CLASS_SETS[NUM_CLASSES]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        clip = table.get(name)
        if clip is None:
            out[name] = {"acted": None, "face_vote": None, "label": None}
            continue
        vote = clip.votes.get("face", "")
        label = crema_label(vote, NUM_CLASSES) if vote else None
        out[name] = {
            "acted": clip.acted,
            "face_vote": classes[label] if label is not None else vote or None,
            "label": classes.index(clip.acted) if label is None and clip.acted in classes else label,
        }
    return out


# ------------------------------------------------------------------------------------------------ IFER g


def _cached_ifer() -> tuple[Path, float] | None:
    """The best IFER export ``train-ifer`` left in the model cache (by dev macro F1), if good enough."""
    from fedfer.agent.files import cache_dir
    from fedfer.agent.records import CLASS_SETS

    best: tuple[Path, float] | None = None
    for manifest in sorted(cache_dir("models").glob("*/*.json")):
        if manifest.parent.name.startswith(_DEMO_IFER_PREFIX):
            continue
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
            f1 = float(meta["dev"]["macro_f1"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if meta.get("kind") != "ifer" or tuple(meta.get("classes", ())) != CLASS_SETS[NUM_CLASSES]:
            continue
        if f1 >= _MIN_CACHED_MACRO_F1 and (best is None or f1 > best[1]):
            best = (manifest, f1)
    return best


def ensure_ifer(config: DemoConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """The IFER export the agents use: given, a cached ``train-ifer`` one, or a quick ``g`` trained now.

    Returns:
        ``{"path", "source", ...}`` where source is ``given``, ``cached`` (a ``train-ifer`` export, with
        its dev macro F1), ``cached-quick`` or ``trained-quick`` (with dev accuracy and seconds spent).
    """
    if config.ifer is not None:
        return {"path": str(config.ifer), "source": "given"}
    cached = _cached_ifer()
    if cached is not None:
        return {"path": str(cached[0]), "source": "cached", "dev_macro_f1": round(cached[1], 4)}
    return _quick_ifer(config, say)


def _quick_ifer(config: DemoConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """Train g (f frozen, the paper's setting) on a FER2013 subset; cache the export by content hash."""
    import torch

    from fedfer.agent.files import cache_dir
    from fedfer.agent.models.export import content_key
    from fedfer.agent.models.ifer import FaceNet, load_backbone, save_ifer
    from fedfer.agent.training.cached import files_digest
    from fedfer.agent.training.data import hash_order, list_image_folder
    from fedfer.agent.training.ifer import IferTrainConfig, evaluate_ifer, prefix_activations, train_ifer

    weights = config.assets / MOBILENET_TFLITE
    items = list_image_folder(config.assets / FER_DIR / "train", NUM_CLASSES)
    # A fixed, content-independent pick: per class the first files in hash order of their names.
    per_class: dict[int, list[Any]] = {}
    for it in hash_order(items):
        bucket = per_class.setdefault(it.label, [])
        if len(bucket) < config.ifer_per_class:
            bucket.append(it)
    chosen = [it for c in sorted(per_class) for it in per_class[c]]
    chosen = hash_order(chosen)
    train_cfg = IferTrainConfig(epochs=8, lr=1e-3, batch_size=64, patience=2)
    labels = np.array([it.label for it in chosen], dtype=np.int64)
    key = content_key(
        "demo-ifer/1",
        hashlib.sha256(weights.read_bytes()).hexdigest(),
        files_digest((it.path for it in chosen), labels.tolist()),
        repr(train_cfg),
    )
    folder = cache_dir("models") / f"{_DEMO_IFER_PREFIX}{key[:32]}"
    manifest = folder / "ifer.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        return {
            "path": str(manifest),
            "source": "cached-quick",
            "dev_accuracy": meta.get("dev_accuracy"),
            "dev_macro_f1": meta.get("dev_macro_f1"),
        }
    say(f"no trained IFER g cached: training a quick g on {len(chosen)} FER2013 faces (f frozen)")
    started = time.monotonic()
    torch.manual_seed(0)
    backbone, norm = load_backbone(weights)
    net = FaceNet(backbone=backbone, normalization=norm, num_classes=NUM_CLASSES, input_size=112, split=19)
    acts = prefix_activations(
        net, chosen, flips=False, progress=lambda done, total: say(f"  FER2013 features {done}/{total}")
    )
    n_dev = max(len(chosen) // 5, NUM_CLASSES)
    train_ifer(net, acts[:, n_dev:], labels[n_dev:], acts[0, :n_dev], labels[:n_dev], config=train_cfg)
    report, probs = evaluate_ifer(net, acts[0, :n_dev], labels[:n_dev])
    accuracy = float(np.mean(probs.argmax(1) == labels[:n_dev]))
    seconds = time.monotonic() - started
    save_ifer(
        net,
        folder,
        extra={"dev_accuracy": accuracy, "dev_macro_f1": report.macro_f1, "images": len(chosen)},
    )
    say(f"  quick g: dev accuracy {100 * accuracy:.1f}% (chance {100 / NUM_CLASSES:.1f}%) in {seconds:.0f}s")
    return {
        "path": str(manifest),
        "source": "trained-quick",
        "dev_accuracy": accuracy,
        "dev_macro_f1": report.macro_f1,
        "images": len(chosen),
        "seconds": round(seconds, 1),
    }


def initial_v(seed: int = 0) -> dict[str, np.ndarray]:
    """The initial central ``v``: a :class:`fedfer.agent.models.video.VideoModel` from a fixed seed."""
    import torch

    from fedfer.agent.models.video import VideoModel, to_named_arrays

    torch.manual_seed(seed)
    return to_named_arrays(VideoModel(num_classes=NUM_CLASSES))


# ---------------------------------------------------------------------------------------------- aggregator


@dataclass
class _Aggregator:
    directory: Path
    proc: subprocess.Popen[bytes]
    port: int
    enroll_port: int
    log: Path


def _start_aggregator(
    config: DemoConfig, children: Children, env: Mapping[str, str], say: Callable[[str], None]
) -> _Aggregator:
    directory = config.workdir / "aggregator"
    agg = str(_BIN / "fedfer-aggregator")
    _run_cli(
        [
            agg,
            "init",
            str(directory),
            "--initial-model",
            "none",
            "--listen",
            "127.0.0.1:0",
            "--min-clients",
            str(config.agents),
            "--max-clients",
            str(config.agents),
            "--deadline-s",
            "180",
            "--complete-graph",
        ],
        env=env,
    )
    model_path = directory / "initial-v.npz"
    savez: Any = np.savez
    savez(model_path, **initial_v())
    imported = json.loads(_run_cli([agg, "import-model", str(directory), str(model_path)], env=env))
    say(
        f"aggregator: deployment {directory} (SQLite, own CA); central v version {imported['version']} "
        f"published ({imported['parameters']:,} parameters, fixed-seed init)"
    )
    ports_file = directory / "ports.json"
    log = config.workdir / "logs" / "aggregator.log"
    proc = children.spawn(
        "aggregator",
        [
            agg,
            "serve",
            "--config",
            str(directory / "aggregator.toml"),
            "--ports-file",
            str(ports_file),
            "--rounds",
            str(config.rounds),
            "--checkin-s",
            "2",
        ],
        log=log,
        env=env,
    )
    deadline = time.monotonic() + 60
    while not ports_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise DemoError(f"the aggregator did not start (see {log})")
        time.sleep(0.1)
    ports = json.loads(ports_file.read_text(encoding="utf-8"))
    say(
        f"aggregator: serving mutual-TLS gRPC on 127.0.0.1:{ports['port']} "
        f"(enrollment on {ports['enroll_port']}), pid {proc.pid}"
    )
    return _Aggregator(directory, proc, int(ports["port"]), int(ports["enroll_port"]), log)


# ------------------------------------------------------------------------------------------------- agents


@dataclass
class _Agent:
    name: str
    root: Path
    clips: list[Path]
    config: Path
    state: Path
    log: Path
    device_id: str = ""
    worker_pids: list[int] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)

    def request(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        from fedfer.agent.daemon.control import ControlClient

        result: dict[str, Any] = ControlClient(self.state, timeout_s=timeout).request(command)
        return result


def _agent_config(
    config: DemoConfig, agent: _Agent, agg: _Aggregator, ifer: Path, camera: int | None = None
) -> str:
    """The agent's TOML: a "camera" folder of linked clips (read once, as fast as vision goes) or a camera."""
    if camera is None:
        capture = (
            f'source = "{agent.root / "camera"}"\nfps = {float(config.fps)}\nrealtime = false\nloop = false\n'
        )
    else:
        capture = f'source = "camera:{camera}"\nfps = {float(config.fps)}\nloop = false\n'
    privacy = (
        f"dp = true\ntarget_epsilon = {float(config.target_epsilon)}\n"
        f"budget = {float(config.target_epsilon) * config.rounds}\n"
        if config.dp
        else "dp = false\n"
    )
    return (
        f'[agent]\nassets_dir = "{config.assets}"\nlog_file = "{agent.log}"\n\n'
        f"[capture]\n{capture}\n"
        f'[vision]\nifer_model = "{ifer}"\n\n'
        f"[learning]\nnum_classes = {NUM_CLASSES}\nepochs = 2\nlr = 0.001\n\n"
        f"[privacy]\n{privacy}\n"
        f'[federation]\nserver = "127.0.0.1:{agg.port}"\nca = "{agg.directory / "pki" / "ca.pem"}"\n'
        "round_timeout_s = 300.0\n\n"
        "[daemon]\nqueue_hwm = 512\nheartbeat_interval_s = 0.5\nheartbeat_timeout_s = 30.0\n"
        "start_timeout_s = 120.0\n"
    )


def _prepare_agent(
    config: DemoConfig,
    index: int,
    clips: list[Path],
    agg: _Aggregator,
    ifer: Path,
    env: Mapping[str, str],
    camera: int | None = None,
) -> _Agent:
    root = config.workdir / f"agent{index + 1}"
    folder = root / "camera"
    folder.mkdir(parents=True, exist_ok=True)
    for clip in clips:
        # The device's "camera": links to the real clips (the assets are read, never copied).
        link = folder / clip.name
        if not link.exists():
            link.symlink_to(clip.resolve())
    agent = _Agent(
        name=f"agent{index + 1}",
        root=root,
        clips=sorted(clips),
        config=root / "agent.toml",
        state=root / "state",
        log=config.workdir / "logs" / f"agent{index + 1}.log",
    )
    agent.config.write_text(_agent_config(config, agent, agg, ifer, camera), encoding="utf-8")
    agent.state.mkdir(mode=0o700, exist_ok=True)
    if camera is not None:
        # One camera, several agents: each starts paused and watches it in turn (pause releases it).
        (agent.state / "agent-state.json").write_text('{"paused": true}', encoding="utf-8")
    token = _run_cli([str(_BIN / "fedfer-aggregator"), "token", str(agg.directory)], env=env).strip()
    out = _run_cli(
        [
            str(_BIN / "fedfer-agent"),
            "enroll",
            "--server",
            f"127.0.0.1:{agg.enroll_port}",
            "--ca",
            str(agg.directory / "pki" / "ca.pem"),
            "--token-file",
            "-",  # on stdin: never on a command line, where other users can read it
            "--state",
            str(agent.state / "federation"),
        ],
        env=env,
        stdin=token + "\n",
    )
    agent.device_id = str(json.loads(out.strip().splitlines()[-1])["device_id"])
    return agent


def _wait(
    what: str, check: Callable[[], bool], *, until: float, agents: Sequence[_Agent] = (), poll: float = 0.5
) -> None:
    while True:
        for agent in agents:
            if agent.proc is not None and agent.proc.poll() is not None:
                raise DemoError(f"{agent.name} exited ({agent.proc.returncode}); see {agent.log}")
        if check():
            return
        if time.monotonic() > until:
            raise DemoError(f"timed out waiting for {what}")
        time.sleep(poll)


def _stats(status: Mapping[str, Any], role: str) -> dict[str, Any]:
    stats: dict[str, Any] = status["workers"][role]["stats"]
    return stats


def _captured(agent: _Agent, *, live: bool = False) -> bool:
    """Capture finished (``live``: paused), every frame processed and record cached, every session sealed."""
    from fedfer.agent.daemon.control import ControlError

    try:
        status = agent.request("status")
        capture, vision, learner = (_stats(status, r) for r in ("capture", "vision", "learner"))
        if "unavailable" in vision or "unavailable" in learner:
            raise DemoError(f"{agent.name}: {vision.get('unavailable') or learner.get('unavailable')}")
        finished = status["workers"]["capture"]["state"] == "paused" if live else capture.get("source_done")
        if not finished or vision.get("frames_in", 0) < capture.get("frames_sent", 0):
            return False
        if learner.get("records_in", 0) < vision.get("records_sent", 0):
            return False
        sessions = agent.request("sessions")["sessions"]
        return bool(sessions) and all(s["sealed"] for s in sessions)
    except ControlError:
        return False


def _run_round(agents: Sequence[_Agent], number: int, *, until: float, say: Callable[[str], None]) -> None:
    from fedfer.agent.daemon.control import ControlError

    job_ids = {}
    for agent in agents:
        job_ids[agent.name] = str(agent.request("join")["job"])
    say(f"round {number}: {len(agents)} agents joined (personalize v on pseudo labels, mask, upload)")
    done: dict[str, dict[str, Any]] = {}

    def finished() -> bool:
        for agent in agents:
            if agent.name in done:
                continue
            with contextlib.suppress(ControlError):
                for job in agent.request("status")["jobs"]:
                    if job.get("id") == job_ids[agent.name] and job.get("state") != "running":
                        done[agent.name] = job
                        result = job.get("result") or {}
                        say(
                            f"round {number}: {agent.name} {job['state']}: "
                            + (
                                f"{result.get('selected')} pseudo-labelled clips, "
                                f"round {result.get('round_id')} "
                                f"{result.get('status')} -> central v{result.get('model_version')}"
                                if job["state"] == "done"
                                else str(job.get("error"))
                            )
                        )
        return len(done) == len(agents)

    _wait(f"round {number}", finished, until=until, agents=agents, poll=1.0)
    for agent in agents:
        job = done[agent.name]
        if job.get("state") != "done" or (job.get("result") or {}).get("status") != "published":
            raise DemoError(f"round {number} failed on {agent.name}: {job.get('error') or job.get('result')}")
        agent.jobs.append(dict(job["result"]))


# ----------------------------------------------------------------------------------------------- analysis


def _registry_models(agg_dir: Path) -> dict[int, dict[str, np.ndarray]]:
    from fedfer.aggregator.registry import ModelRegistry
    from fedfer.aggregator.storage import open_storage

    with open_storage(f"sqlite://{agg_dir / 'aggregator.db'}") as storage:
        registry = ModelRegistry(storage)
        return {v: dict(registry.get(v).arrays) for v in storage.list_model_versions()}


def _uploads(agg_dir: Path, round_ids: Sequence[int]) -> dict[int, dict[str, dict[str, int]]]:
    """Bytes the aggregator received and stored, per round, device and protocol stage."""
    from fedfer.aggregator.storage import open_storage
    from fedfer.security.secagg.stage import COLLECTING

    stages = COLLECTING  # the protocol stages
    out: dict[int, dict[str, dict[str, int]]] = {}
    with open_storage(f"sqlite://{agg_dir / 'aggregator.db'}") as storage:
        for rid in round_ids:
            per_device: dict[str, dict[str, int]] = {}
            for stage in stages:
                for device, payload in storage.round_messages(rid, stage=stage).items():
                    per_device.setdefault(device, {})[stage.key] = len(payload)
            out[rid] = per_device
    return out


def _flat(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in sorted(arrays)])


def _evaluate_agent(
    agent: _Agent, models: Mapping[str, Mapping[str, np.ndarray]], crowd: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """On-device evaluation: v on the agent's cached clips vs its pseudo labels and the crowd's votes."""
    from fedfer.agent.config import apply_path_overrides, load_config
    from fedfer.agent.learning.personalize import (
        PersonalizeConfig,
        pad_clips,
        personalize,
        predict_clips,
        pseudo_labels,
    )
    from fedfer.agent.models.video import VideoModel, from_named_arrays
    from fedfer.agent.records import CLASS_SETS
    from fedfer.agent.store.device import open_cache
    from fedfer.bench.atrest import scan_paths

    # The agent already warned (in its own log) if DP is off; parsing its config again need not repeat it.
    config_log = logging.getLogger("fedfer.agent.config")
    level = config_log.level
    config_log.setLevel(logging.ERROR)
    try:
        cfg = apply_path_overrides(load_config(agent.config), {"FEDFER_STATE_DIR": str(agent.state)})
    finally:
        config_log.setLevel(level)
    cache = open_cache(cfg)
    feats: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    try:
        infos = sorted(cache.sessions(), key=lambda i: i.created)
        for info in infos:
            records = [r for _, r in cache.recover_session(info.session_id).records]
            feats.append(np.stack([r.feature for r in records]).astype(np.float32))
            probs.append(np.stack([r.ifer_probs for r in records]).astype(np.float32))
        cache_bytes = int(sum(i.bytes for i in infos))
        sealed = all(i.sealed for i in infos)
    finally:
        cache.close()
    classes = CLASS_SETS[NUM_CLASSES]
    labels, confidence = pseudo_labels(probs)
    # Sessions follow the files in order (one session per clip when each clip has faces throughout).
    names = [c.name.rsplit(".", 1)[0] for c in agent.clips]
    mapped = len(names) == len(feats)
    truth = [crowd.get(n, {}).get("label") for n in names] if mapped else [None] * len(feats)
    # Nothing recognisable may sit on disk in clear: scan the device's files (its state except the public
    # central v it downloaded, and its logs) for frames, crops, float runs and the vectors just decrypted.
    known = [f[0] for f in feats[:4]]
    roots = [p for p in agent.state.iterdir() if p.name != "models"] + [agent.log, agent.root / "daemon.log"]
    scan = scan_paths(roots, known_vectors=known)
    result: dict[str, Any] = {
        "sessions": len(feats),
        "frames": int(sum(len(f) for f in feats)),
        "cache_bytes": cache_bytes,
        "sessions_sealed": sealed,
        "at_rest_scan_clean": scan.clean,
        "at_rest_findings": len(scan.findings),
        "clips": names,
        "pseudo_labels": [classes[int(i)] for i in labels],
        "pseudo_confidence": [round(float(c), 3) for c in confidence],
        "crowd_face_vote": [crowd.get(n, {}).get("face_vote") for n in names] if mapped else None,
        "acted": [crowd.get(n, {}).get("acted") for n in names] if mapped else None,
        "accuracy": {},
    }
    if not feats:
        return result
    x = pad_clips(feats)
    candidates: dict[str, VideoModel] = {}
    for tag, arrays in models.items():
        model = VideoModel(num_classes=NUM_CLASSES)
        from_named_arrays(model, {k: np.array(v, dtype=np.float32) for k, v in arrays.items()})
        candidates[tag] = model
    # "After personalization" in the paper's sense: this device personalizes the final central v on its own
    # clips (plain training, the paper's settings); that personal v is evaluated here and never leaves.
    last = list(models)[-1]
    personal, _ = personalize(
        {k: np.array(v, dtype=np.float32) for k, v in models[last].items()},
        feats,
        probs,
        num_classes=NUM_CLASSES,
        config=PersonalizeConfig(),
    )
    candidates[f"personal_from_{last}"] = personal
    for tag, model in candidates.items():
        pred = predict_clips(model, x).argmax(1)
        entry: dict[str, Any] = {
            "predictions": [classes[int(i)] for i in pred],
            "vs_pseudo": round(float(np.mean(pred == labels)), 3),
        }
        scored = [(int(p), t) for p, t in zip(pred, truth, strict=True) if t is not None]
        entry["vs_crowd"] = round(float(np.mean([p == t for p, t in scored])), 3) if scored else None
        result["accuracy"][tag] = entry
    ifer_scored = [(int(p), t) for p, t in zip(labels, truth, strict=True) if t is not None]
    result["ifer_vs_crowd"] = (
        round(float(np.mean([p == t for p, t in ifer_scored])), 3) if ifer_scored else None
    )
    return result


def _expected_masked_bytes(dim: int, modulus_bits: int = 32) -> int:
    # dim weighted coordinates + the weight itself, each packed to ceil(k / 8) bytes.
    return (dim + 1) * ((modulus_bits + 7) // 8)


# ------------------------------------------------------------------------------------------------- driver


def run_demo(config: DemoConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole demo and return its summary (also written to ``workdir/summary.json``).

    Raises:
        DemoError: a step failed or timed out; every child process is stopped before it propagates.
    """
    started = time.monotonic()
    until = started + config.timeout_s
    workdir = config.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if any((workdir / sub).exists() for sub in ("aggregator", "agent1")):
        raise ValidationError(f"{workdir} already holds a demo; choose an empty --workdir")
    (workdir / "logs").mkdir(exist_ok=True)
    env = _child_env(config.assets)

    def progress(text: str) -> None:
        say(f"[{time.monotonic() - started:6.1f}s] {text}")

    source = parse_source(config.source, config.assets)
    shares = split_clips(source.clips, config.agents) if source.camera is None else [[]] * config.agents
    ifer = ensure_ifer(config, progress)
    progress(f"IFER g: {ifer['source']} ({ifer['path']})")
    children = Children()
    agents: list[_Agent] = []
    try:
        agg = _start_aggregator(config, children, env, progress)
        for i, share in enumerate(shares):
            agent = _prepare_agent(config, i, share, agg, Path(ifer["path"]), env, source.camera)
            agents.append(agent)
            watches = (
                f"camera:{source.camera}" if source.camera is not None else ", ".join(c.name for c in share)
            )
            progress(f"{agent.name}: enrolled as device {agent.device_id[:12]}… over TLS; camera = {watches}")
        for agent in agents:
            agent.proc = children.spawn(
                agent.name,
                [
                    str(_BIN / "fedfer-agent"),
                    "run",
                    "--config",
                    str(agent.config),
                    "--state-dir",
                    str(agent.state),
                ],
                log=agent.root / "daemon.log",
                env=env,
            )
        progress(f"started {len(agents)} agent daemons (supervisor + capture/vision/learner workers each)")
        _wait(
            "the agents' control sockets", lambda: all(_alive(a) for a in agents), until=until, agents=agents
        )
        if source.camera is not None:
            _watch_camera_in_turn(config, agents, until=until, say=progress)
        pending = {a.name for a in agents}

        def all_captured() -> bool:
            for agent in agents:
                if agent.name in pending and _captured(agent, live=source.camera is not None):
                    pending.discard(agent.name)
                    workers = agent.request("status")["workers"].values()
                    agent.worker_pids = [int(w["pid"]) for w in workers if w["pid"] is not None]
                    sessions = agent.request("sessions")["sessions"]
                    progress(
                        f"{agent.name}: video watched; {len(sessions)} encrypted sessions, "
                        f"{sum(s['frames'] for s in sessions)} face frames cached"
                    )
            return not pending

        _wait("capture -> faces -> f -> g -> encrypted cache", all_captured, until=until, agents=agents)
        capture_s = time.monotonic() - started
        for number in range(1, config.rounds + 1):
            _run_round(agents, number, until=until, say=progress)
        # Drain all agents at once (each takes a few seconds), then check each stopped cleanly.
        procs = [a.proc for a in agents if a.proc is not None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for agent, proc in zip(agents, procs, strict=True):
            code = children.stop(proc, signalled=True)
            if code != 0:
                raise DemoError(f"{agent.name} did not stop cleanly ({code})")
        # After its last round, `serve --rounds N` keeps serving status until it is stopped.
        code = children.stop(agg.proc)
        progress(f"stopped the agents and the aggregator (aggregator exit status {code})")
        summary = _summarize(config, agg, agents, ifer, started, capture_s)
    finally:
        children.stop_all()
    summary["child_pids"] = children.pids
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["problems"] = _problems(config, summary)
    summary["ok"] = not summary["problems"]
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True), encoding="utf-8")
    return summary


def _watch_camera_in_turn(
    config: DemoConfig, agents: Sequence[_Agent], *, until: float, say: Callable[[str], None]
) -> None:
    """Each agent (started paused) watches the camera for ``camera_s`` seconds, one after the other."""
    for agent in agents:
        agent.request("resume")
        say(f"{agent.name}: watching the camera for {config.camera_s:g}s (look at it; faces are cached)")
        time.sleep(config.camera_s)
        agent.request("pause")  # releases the camera for the next agent
        _wait(
            f"{agent.name}'s capture to pause", functools.partial(_paused, agent), until=until, agents=agents
        )


def _paused(agent: _Agent) -> bool:
    from fedfer.agent.daemon.control import ControlError

    try:
        return bool(agent.request("status")["workers"]["capture"]["state"] == "paused")
    except ControlError:
        return False


def _alive(agent: _Agent) -> bool:
    from fedfer.agent.daemon.control import ControlError

    try:
        status = agent.request("status")
    except ControlError:
        return False
    return all(w["heartbeat_age_s"] is not None for w in status["workers"].values())


def _summarize(
    config: DemoConfig,
    agg: _Aggregator,
    agents: Sequence[_Agent],
    ifer: Mapping[str, Any],
    started: float,
    capture_s: float,
) -> dict[str, Any]:
    status = json.loads(
        _run_cli([str(_BIN / "fedfer-aggregator"), "status", str(agg.directory)], env=os.environ)
    )
    rounds = [r for r in status["rounds"] if r["status"] == "published"]
    models = _registry_models(agg.directory)
    versions = sorted(models)
    first, last = versions[0], versions[-1]
    norms = []
    for prev, cur in itertools.pairwise(versions):
        delta = _flat(models[cur]) - _flat(models[prev])
        norms.append(
            {
                "from": prev,
                "to": cur,
                "l2": round(float(np.linalg.norm(delta)), 6),
                "max_abs": round(float(np.max(np.abs(delta))), 6),
            }
        )
    dim = int(_flat(models[first]).size)
    expected_masked = _expected_masked_bytes(dim)
    uploads = _uploads(agg.directory, [int(r["round_id"]) for r in rounds])
    crowd = _crowd_labels(config.assets, [c.name.rsplit(".", 1)[0] for a in agents for c in a.clips])
    eval_models = {f"central_v{first}": models[first], f"central_v{last}": models[last]}
    per_agent = []
    for agent in agents:
        evaluation = _evaluate_agent(agent, eval_models, crowd)
        sent = {
            str(rid): {
                "stages": per_device.get(agent.device_id, {}),
                "total": int(sum(per_device.get(agent.device_id, {}).values())),
            }
            for rid, per_device in uploads.items()
        }
        per_agent.append(
            {
                "name": agent.name,
                "device_id": agent.device_id,
                "state_dir": str(agent.state),
                "config": str(agent.config),
                "rounds": agent.jobs,
                "worker_pids": agent.worker_pids,
                "uploaded_bytes": sent,
                "epsilon_total": agent.jobs[-1].get("epsilon_total") if agent.jobs else None,
                **evaluation,
            }
        )
    return {
        "agents": per_agent,
        "aggregator": {
            "directory": str(agg.directory),
            "database": str(agg.directory / "aggregator.db"),
            "log": str(agg.log),
            "rounds": rounds,
            "model_versions": versions,
            "update_norms": norms,
            "parameters": dim,
            "expected_masked_input_bytes": expected_masked,
        },
        "ifer": dict(ifer),
        "dp": config.dp,
        "target_epsilon": config.target_epsilon if config.dp else None,
        "capture_seconds": round(capture_s, 1),
        "workdir": str(config.workdir),
    }


def _problems(config: DemoConfig, summary: Mapping[str, Any]) -> list[str]:
    """What the run must have achieved and did not (empty when everything holds)."""
    agg = summary["aggregator"]
    problems = []
    if len(agg["rounds"]) != config.rounds or len(agg["model_versions"]) != config.rounds + 1:
        problems.append(f"expected {config.rounds} published rounds and {config.rounds + 1} central versions")
    if not all(n["l2"] > 0 for n in agg["update_norms"]):
        problems.append("a published round left the central v unchanged")
    masked = agg["expected_masked_input_bytes"]
    for a in summary["agents"]:
        if not a["sessions"] or not a["at_rest_scan_clean"]:
            problems.append(f"{a['name']}: no encrypted sessions, or plaintext found at rest")
        for rid, sent in a["uploaded_bytes"].items():
            got = sent["stages"].get("masked_input", 0)
            if not masked <= got <= masked + _MASKED_ENVELOPE_MAX:
                problems.append(f"{a['name']}: round {rid} masked input of {got} bytes, expected ~{masked}")
        for job in a["rounds"]:
            # The device's own count of what it sent must cover what the aggregator stored from it, plus no
            # more than the requests' envelopes and polls (a surplus would be something else leaving it).
            counted, stored = job.get("wire_payload_bytes"), a["uploaded_bytes"].get(str(job["round_id"]))
            if counted is None or stored is None:
                problems.append(f"{a['name']}: round {job['round_id']} has no byte count from both sides")
            elif not stored["total"] <= counted <= stored["total"] + _REQUEST_ENVELOPES_MAX:
                problems.append(
                    f"{a['name']}: round {job['round_id']}: the device counted {counted} payload bytes, "
                    f"the aggregator stored {stored['total']}"
                )
    return problems


def format_summary(summary: Mapping[str, Any]) -> str:
    """The human-readable end-of-demo summary."""
    agg = summary["aggregator"]
    lines = ["", "=== fedfer demo summary ==="]
    ifer = summary["ifer"]
    extra = "".join(
        f", dev {label} {100 * ifer[key]:.1f}%"
        for key, label in (("dev_accuracy", "accuracy"), ("dev_macro_f1", "macro F1"))
        if ifer.get(key) is not None
    )
    lines.append(f"IFER g: {ifer['source']}{extra}  ({ifer['path']})")
    versions = agg["model_versions"]
    lines.append(
        f"central v: versions {versions} ({agg['parameters']:,} parameters); "
        f"{len(agg['rounds'])} secure-aggregation rounds published"
    )
    for n in agg["update_norms"]:
        lines.append(
            f"  v{n['from']} -> v{n['to']}: update L2 norm {n['l2']:.4f}, max |change| {n['max_abs']:.4f}"
        )
    lines.append("per agent (on-device evaluation on its own clips):")
    for a in summary["agents"]:
        lines.append(
            f"  {a['name']} ({a['device_id'][:12]}…): {a['sessions']} encrypted sessions, "
            f"{a['frames']} face frames, {a['cache_bytes']:,} cache bytes; at-rest scan of its files "
            f"{'clean' if a['at_rest_scan_clean'] else 'FOUND PLAINTEXT'}"
        )
        for clip, pl, conf, vote in zip(
            a["clips"],
            a["pseudo_labels"],
            a["pseudo_confidence"],
            a["crowd_face_vote"] or [None] * len(a["clips"]),
            strict=False,
        ):
            lines.append(f"    {clip}: pseudo label {pl} ({conf:.2f}); crowd face vote {vote}")
        acc = a["accuracy"]
        for tag, entry in acc.items():
            lines.append(
                f"    {tag}: accuracy vs pseudo labels {entry['vs_pseudo']:.2f}, vs crowd {entry['vs_crowd']}"
                f" (predicts {', '.join(entry['predictions'])})"
            )
        lines.append(f"    IFER (mean over frames) vs crowd: {a.get('ifer_vs_crowd')}")
        for job in a["rounds"]:
            lines.append(
                f"    round {job['round_id']}: personalized v{job['base_version']} on {job['selected']} of "
                f"{job['sessions']} clips (pseudo labels per class {job['per_class']})"
            )
        counted = {str(j["round_id"]): j for j in a["rounds"] if "wire_bytes" in j}
        for rid, sent in a["uploaded_bytes"].items():
            stages = ", ".join(f"{k} {v:,}" for k, v in sorted(sent["stages"].items()))
            lines.append(f"    round {rid}: the aggregator stored {sent['total']:,} bytes from it ({stages})")
            if rid in counted:
                job = counted[rid]
                lines.append(
                    f"    round {rid}: the device counted {job['wire_payload_bytes']:,} bytes of requests in "
                    f"{job['wire_calls']} calls, ~{job['wire_bytes']:,} on the wire with gRPC/TLS framing"
                )
        if summary["dp"]:
            lines.append(f"    DP-SGD: epsilon spent {a['epsilon_total']:.2f} (delta 1e-5)")
    lines.append(
        f"what left each device: only protocol messages; the masked input is "
        f"{agg['expected_masked_input_bytes']:,} bytes = (parameters + 1 weight) x 4 bytes mod 2^32"
    )
    lines.append(f"state: {summary['workdir']} (aggregator DB {agg['database']}; agent*/state; logs/)")
    lines.append(f"took {summary['seconds']}s")
    for problem in summary["problems"]:
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines)


def _default_assets() -> Path:
    return assets_dir()


@contextlib.contextmanager
def _interrupts_as_exceptions() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so ``finally`` blocks stop every child either way."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fedfer.bench.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedfer.bench.demo", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="new folder for all the demo's state (default: a fresh /tmp dir)",
    )
    parser.add_argument("--assets", type=Path, default=None, help="shared assets (default: $FEDFER_ASSETS)")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fps", type=float, default=8.0, help="frames sampled per second of video")
    parser.add_argument("--dp", action="store_true", help="personalize with DP-SGD and report epsilon")
    parser.add_argument("--epsilon", type=float, default=4.0, help="epsilon per round with --dp")
    parser.add_argument("--ifer", type=Path, default=None, help="IFER export manifest to use")
    parser.add_argument(
        "--source",
        default="",
        help="what the agents watch: camera:N (each agent in turn) or PATH[,PATH...] (video files or "
        "folders); default: the CREMA-D clips in the assets folder",
    )
    parser.add_argument("--camera-seconds", type=float, default=20.0, help="with a camera: seconds per agent")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--json-summary", type=Path, default=None, help="also write the summary JSON here")
    args = parser.parse_args(argv)
    try:
        config = DemoConfig(
            workdir=(args.workdir or Path(tempfile.mkdtemp(prefix="fedfer-demo-", dir="/tmp"))).absolute(),
            assets=(args.assets or _default_assets()).absolute(),
            agents=args.agents,
            rounds=args.rounds,
            fps=args.fps,
            dp=args.dp,
            target_epsilon=args.epsilon,
            ifer=args.ifer.absolute() if args.ifer else None,
            timeout_s=args.timeout_s,
            source=args.source,
            camera_s=args.camera_seconds,
        )
        with _interrupts_as_exceptions():
            summary = run_demo(config, say=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        print("demo interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    except FedferError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary), flush=True)
    if args.json_summary is not None:
        args.json_summary.write_text(json.dumps(summary, indent=2, sort_keys=True), encoding="utf-8")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
