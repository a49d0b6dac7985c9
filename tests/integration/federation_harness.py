"""Test support for federation tests: real deployments, real aggregator and device processes, real TLS.

Everything goes through the shipped command lines (``fedfer-aggregator``, ``fedfer-agent``) or the public
Python API; nothing is stubbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from fedfer.agent.federation.enroll import enroll
from fedfer.agent.federation.state import DeviceState
from fedfer.aggregator.config import (
    create_enrollment_token,
    init_deployment,
    load_config,
    read_certificate_authority,
    read_server_tls,
)
from fedfer.aggregator.enrollment import EnrollmentService, issue_token
from fedfer.aggregator.leader import LeaderLease
from fedfer.aggregator.registry import ModelRegistry
from fedfer.aggregator.rounds import RoundCoordinator, RoundSettings
from fedfer.aggregator.server import RunningServer, ServerTls, build_server
from fedfer.aggregator.service import EdgeLimits
from fedfer.aggregator.storage import Storage, open_storage
from fedfer.security.quantize import FixedPointCodec
from fedfer.security.secagg import Stage

BIN = Path(sys.executable).parent
DIM = 1000
LIMITS = EdgeLimits(
    max_message_bytes=256 * 1024, max_payload_bytes=64 * 1024, max_upload_bytes=8 * DIM + 4096
)
REPO = Path(__file__).resolve().parents[2]
# PYTHONPATH: the test-only wrapper (tests.integration.stalling_agent) is imported from this checkout.
_ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
}


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli_result(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a fedfer console script to completion and return it, whatever its exit status."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, env=_ENV
    )


def run_cli(*args: str, timeout: float = 60.0) -> str:
    """Run a fedfer console script to completion and return its stdout (raises on failure)."""
    proc = run_cli_result(*args, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} {args[1]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


class Aggregator:
    """A ``fedfer-aggregator serve`` subprocess (several may serve one deployment: replicas)."""

    def __init__(self, deployment: Deployment, extra: Sequence[str]) -> None:
        name = f"serve-{time.monotonic_ns()}"
        self.log_path = deployment.dir / f"{name}.log"
        ports_file = deployment.dir / f"{name}.ports.json"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "fedfer-aggregator"), "serve", "--config", str(deployment.config), "--ports-file",
             str(ports_file), *extra],
            stdout=subprocess.DEVNULL, stderr=self._log, env=_ENV,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not ports_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aggregator did not start: {self.log()[-2000:]}")
            time.sleep(0.05)
        ports = json.loads(ports_file.read_text())
        self.port: int = ports["port"]
        self.enroll_port: int = ports["enroll_port"]
        self.health_port: int = ports["health_port"]

    def log(self) -> str:
        """What the aggregator logged so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` and wait for the process to end; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self._log.close()
        return code


class Device:
    """An enrolled device's state directory and, while running, its ``fedfer-agent join-round`` process.

    The process's stdout (one JSON object per line) is read by a background thread, so waiting for a line
    never blocks past its timeout; stderr goes to a log file beside the state directory.
    """

    def __init__(self, state: Path, device_id: str) -> None:
        self.state = state
        self.device_id = device_id
        self.proc: subprocess.Popen[str] | None = None
        self.update_path = state.parent / f"{state.name}-update.npz"
        self.err_path = state.parent / f"{state.name}-stderr.log"
        self._lines: queue.Queue[str] = queue.Queue()
        self._seen: list[dict[str, Any]] = []
        self._pump: threading.Thread | None = None

    def start(
        self,
        update: npt.NDArray[np.float64],
        weight: int,
        *,
        rounds: int = 1,
        attempts: int | None = None,
        stall_after: str | None = None,
        stall_round: int = 1,
        timeout_s: float = 120.0,
        hostile: Sequence[str] = (),
    ) -> None:
        """Start ``fedfer-agent join-round`` with this update (``hostile``: modes of
        :mod:`tests.integration.hostile_agent` for this device)."""
        np.savez(self.update_path, update=update, weight=np.array(weight))
        agent = [str(BIN / "fedfer-agent")]
        if stall_after is not None:  # the real command line, with a test-only hook that hangs the device
            agent = [sys.executable, "-m", "tests.integration.stalling_agent", "--stall-after", stall_after,
                     "--stall-round", str(stall_round)]  # fmt: skip
        elif hostile:  # the real command line, with this one device patched to misbehave
            agent = [sys.executable, "-m", "tests.integration.hostile_agent", *hostile]
        cmd = [*agent, "join-round", "--state", str(self.state), "--update", str(self.update_path),
               "--rounds", str(rounds), "--timeout-s", str(timeout_s)]  # fmt: skip
        if attempts is not None:
            cmd += ["--attempts", str(attempts)]
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_ENV)
        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                self._lines.put(line)
            self._lines.put("")

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()

    def _next(self, deadline: float) -> dict[str, Any] | None:
        """The next JSON line, or None at end of output; TimeoutError at ``deadline``."""
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError("no output from the device in time") from None
            if not line:
                self._lines.put("")  # keep the end marker for later readers
                return None
            if line.strip():
                record: dict[str, Any] = json.loads(line)
                self._seen.append(record)
                return record

    def wait_for_line(self, key: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the device prints a JSON line containing ``key`` and return it."""
        deadline = time.monotonic() + timeout
        while True:
            record = self._next(deadline)
            if record is None:
                raise RuntimeError(f"device exited before printing {key}: {self.stderr()[-1500:]}")
            if key in record:
                return record

    def stderr(self) -> str:
        """What the device logged so far."""
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def finish(self, timeout: float = 120.0) -> tuple[int, list[dict[str, Any]], str]:
        """Wait for the process; return its exit status, all its JSON output lines and its stderr."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + 30
        while self._next(deadline) is not None:
            pass
        return code, list(self._seen), self.stderr()

    def kill(self) -> None:
        """SIGKILL the device process (a device that vanished)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class Deployment:
    """A deployment directory created by ``fedfer-aggregator init``, with an initial central model.

    ``initial="import"`` (the default) runs ``init --initial-model none`` and imports ``model`` (or
    :func:`default_model`) with ``import-model``, as an operator with their own v does; ``"shipped"``,
    ``"random"`` and ``"none"`` pass that ``--initial-model`` and import nothing.
    """

    def __init__(
        self,
        directory: Path,
        *,
        min_clients: int,
        max_clients: int,
        deadline_s: float,
        threshold: int | None = None,
        complete_graph: bool = False,
        listen: str = "127.0.0.1:0",
        model: dict[str, npt.NDArray[np.float32]] | None = None,
        storage_url: str | None = None,
        initial: str = "import",
    ) -> None:
        assert model is None or initial == "import", "a model is imported only with initial='import'"
        self.dir = directory
        choice = ["--initial-model", "none" if initial == "import" else initial]
        args = ["fedfer-aggregator", "init", str(directory), *choice, "--listen", listen]
        args += ["--min-clients", str(min_clients), "--max-clients", str(max_clients)]
        args += ["--deadline-s", str(deadline_s)]
        if threshold is not None:
            args += ["--threshold", str(threshold)]
        if complete_graph:
            args.append("--complete-graph")
        run_cli(*args)
        self.config = directory / "aggregator.toml"
        self.storage_url = storage_url or f"sqlite://{directory / 'aggregator.db'}"
        if storage_url is not None:  # as docs/deploy-aggregator.md says: edit [storage] url after init
            text = self.config.read_text()
            default = f'url = "sqlite://{directory.resolve() / "aggregator.db"}"'
            assert default in text
            self.config.write_text(text.replace(default, f'url = "{storage_url}"'))
            run_cli("fedfer-aggregator", "create-storage", str(directory), *choice)
        self.ca_pem = (directory / "pki" / "ca.pem").read_bytes()
        if initial == "import":
            model_path = directory / "model0.npz"
            np.savez(model_path, **(model or default_model()))  # type: ignore[arg-type]
            run_cli("fedfer-aggregator", "import-model", str(directory), str(model_path))

    def serve(self, *extra: str) -> Aggregator:
        """Start the aggregator."""
        return Aggregator(self, extra)

    def token(self) -> str:
        """A fresh one-time enrollment token."""
        return run_cli("fedfer-aggregator", "token", str(self.dir)).strip()

    def enroll_devices(self, count: int, enroll_port: int, root: Path) -> list[Device]:
        """Enroll ``count`` devices over real TLS (in this process, concurrently)."""

        async def one(i: int, token: str) -> Device:
            state = await enroll(
                server=f"127.0.0.1:{enroll_port}", ca_pem=self.ca_pem, token=token, state_dir=root / f"dev{i}"
            )
            return Device(state.directory, state.device_id)

        # The call `fedfer-aggregator token` makes, without a process start per token.
        config = load_config(self.config)
        tokens = [create_enrollment_token(config).token for _ in range(count)]

        async def all_devices() -> list[Device]:
            return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(tokens))))

        return asyncio.run(all_devices())

    def hold_round_two_in_masked_input(
        self,
        devices: list[Device],
        updates: dict[str, npt.NDArray[np.float64]],
        weights: dict[str, int],
        *,
        rounds: int,
        timeout_s: float = 120.0,
    ) -> tuple[Device, list[Device]]:
        """Start every device so that round 2 waits in the masked-input stage, and return once it does.

        Round 1 runs with all devices. In round 2 the first device (the staller) hangs after sharing keys,
        so the stage stays open until its deadline; this returns once the others' masked inputs are stored.
        The others take part in ``rounds`` rounds (with one spare attempt).

        Returns:
            ``(staller, others)``.
        """
        staller, *others = devices
        staller.start(
            updates[staller.device_id],
            weights[staller.device_id],
            rounds=2,
            stall_after="share_keys",
            stall_round=2,
        )
        for d in others:
            d.start(
                updates[d.device_id],
                weights[d.device_id],
                rounds=rounds,
                attempts=rounds + 1,
                timeout_s=timeout_s,
            )
        staller.wait_for_line("stalled", timeout=120)
        deadline = time.monotonic() + 60
        while self.stored_messages(2, "masked_input") < len(others):
            assert time.monotonic() < deadline, "the masked inputs never arrived"
            time.sleep(0.1)
        return staller, others

    def status(self) -> dict[str, Any]:
        """Rounds and model versions as the storage records them."""
        out: dict[str, Any] = json.loads(run_cli("fedfer-aggregator", "status", str(self.dir)))
        return out

    def model(self, version: int) -> dict[str, npt.NDArray[np.float32]]:
        """A verified model version read from the registry."""
        with open_storage(self.storage_url) as storage:
            return dict(ModelRegistry(storage).get(version).arrays)

    def stored_messages(self, round_id: int, stage: str) -> int:
        """How many device messages storage holds for one stage of a round."""
        with open_storage(self.storage_url) as storage:
            return len(storage.round_message_senders(round_id, stage=Stage.from_key(stage)))

    def round_statuses(self) -> list[str]:
        """The status of every round, oldest first (read from storage directly)."""
        with open_storage(self.storage_url) as storage:
            return [r.status.key for r in reversed(storage.list_rounds(limit=1000))]

    def device_ids(self) -> list[str]:
        """Ids of the devices registered in storage."""
        with open_storage(self.storage_url) as storage:
            return sorted(d.device_id for d in storage.list_devices())


@dataclass
class Harness:
    """A running in-process aggregator (real TLS sockets) and what the tests need around it."""

    root: Path
    storage: Storage
    enrollment: EnrollmentService
    coordinator: RoundCoordinator
    server: RunningServer
    ca_pem: bytes
    task: asyncio.Task[None]

    async def enroll(self, name: str) -> DeviceState:
        """Enroll a device over the enrollment port; its state goes to ``root/name``."""
        token = issue_token(self.storage, now=dt.datetime.now(dt.UTC)).token
        return await enroll(
            server=f"127.0.0.1:{self.server.enroll_port}",
            ca_pem=self.ca_pem,
            token=token,
            state_dir=self.root / name,
        )

    async def close(self) -> None:
        """Stop rounds and server, give the lease up (as a clean shutdown does); close storage."""
        self.coordinator.stop()
        await self.server.stop(grace=0.5)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        self.coordinator.release()
        self.storage.close()


async def start(root: Path, settings: RoundSettings, *, limits: EdgeLimits = LIMITS) -> Harness:
    """Create a deployment under ``root`` and start an in-process aggregator on free loopback ports."""
    config = init_deployment(root / "agg", listen="127.0.0.1:0")
    with open_storage(config.storage_url) as storage:
        rng = np.random.default_rng(0)
        ModelRegistry(storage).publish(
            1, {"w": rng.standard_normal(DIM).astype(np.float32)}, parent=None, origin="random:seed=0"
        )
    return await start_replica(root, settings, limits=limits)


async def start_replica(
    root: Path, settings: RoundSettings, *, limits: EdgeLimits = LIMITS, lease_ttl_s: float = 15.0
) -> Harness:
    """Start one more aggregator (its own storage connection, coordinator and ports) on the deployment that
    :func:`start` created under ``root``: a replica, leader or standby depending on who holds the lease."""
    config = load_config(root / "agg" / "aggregator.toml")
    key_pem, cert_pem, ca_pem = read_server_tls(config)
    storage = open_storage(config.storage_url)
    registry = ModelRegistry(storage)
    enrollment = EnrollmentService(storage=storage, ca=read_certificate_authority(config))
    lease = LeaderLease(storage, cohort=settings.cohort, ttl_s=lease_ttl_s)
    coordinator = RoundCoordinator(storage=storage, registry=registry, settings=settings, lease=lease)
    server = await build_server(
        tls=ServerTls(certificate_pem=cert_pem, private_key_pem=key_pem, ca_certificate_pem=ca_pem),
        storage=storage,
        registry=registry,
        enrollment=enrollment,
        coordinator=coordinator,
        limits=limits,
        listen="127.0.0.1:0",
        enroll_listen="127.0.0.1:0",
        health_listen="127.0.0.1:0",
    )
    task = asyncio.create_task(coordinator.serve())
    return Harness(root, storage, enrollment, coordinator, server, ca_pem, task)


def run_in_process(
    root: Path,
    settings: RoundSettings,
    body: Callable[[Harness], Awaitable[None]],
    *,
    limits: EdgeLimits = LIMITS,
) -> None:
    """Start an in-process aggregator (real TLS sockets), run ``body`` against it, then stop it."""

    async def main() -> None:
        harness = await start(root, settings, limits=limits)
        try:
            await asyncio.wait_for(body(harness), timeout=120)
        finally:
            await harness.close()

    asyncio.run(main())


def default_model() -> dict[str, npt.NDArray[np.float32]]:
    """A small central model: 1,000 parameters in two named arrays."""
    rng = np.random.default_rng(7)
    return {
        "fc.weight": rng.standard_normal((24, 40)).astype(np.float32),
        "fc.bias": rng.standard_normal(40).astype(np.float32),
    }


def flat(model: dict[str, npt.NDArray[np.float32]]) -> npt.NDArray[np.float64]:
    """Arrays concatenated in manifest order (names sorted), as float64."""
    return np.concatenate([np.asarray(model[n], dtype=np.float64).ravel() for n in sorted(model)])


def oracle_mean(updates: dict[str, npt.NDArray[np.float64]], weights: dict[str, int], clip: float) -> Any:
    """The plaintext FedAvg mean of clipped updates over the given devices."""
    total = sum(weights[d] for d in updates)
    acc = sum(weights[d] * np.clip(updates[d], -clip, clip) for d in updates)
    return acc / total


CLIP = 1.0
MAX_WEIGHT = 10_000


def random_updates(
    devices: list[Device], seed: int
) -> tuple[dict[str, npt.NDArray[np.float64]], dict[str, int]]:
    """One update of the default model's length and one weight per device (some beyond the clip)."""
    rng = np.random.default_rng(seed)
    updates = {d.device_id: rng.normal(0.0, 0.6, DIM) for d in devices}
    weights = {d.device_id: int(rng.integers(1, 200)) for d in devices}
    return updates, weights


def assert_published(
    deployment: Deployment,
    version: int,
    parent: int,
    updates: dict[str, npt.NDArray[np.float64]],
    weights: dict[str, int],
    n: int,
) -> None:
    """Model ``version`` is ``parent`` plus the plaintext FedAvg oracle of ``updates``, within the fixed-point
    codec's stated bound for a round of ``n`` devices (plus float32 rounding of the stored model)."""
    codec = FixedPointCodec(dim=DIM, clip=CLIP, max_weight=MAX_WEIGHT, max_clients=n, modulus_bits=32)
    tol = codec.mean_error_bound(survivors=len(updates), total_weight=sum(weights.values())) + 1e-6
    expected = flat(deployment.model(parent)) + oracle_mean(updates, weights, CLIP)
    err = float(np.max(np.abs(flat(deployment.model(version)) - expected)))
    assert err <= tol, f"max error {err} exceeds the stated bound {tol}"
