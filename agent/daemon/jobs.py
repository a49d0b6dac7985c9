"""The learner's jobs: ``personalize`` and ``join``, run one at a time and cancelled when the agent stops.

* ``personalize`` fine-tunes ``v`` on the cached sessions (DP-SGD when ``privacy.dp``); the result stays on
  the device, inside the encrypted cache (:func:`fedfer.agent.store.device.save_personal_model`). Records
  that fail verification are left out; the result counts them (``records_rejected``, ``sessions_damaged``).
* ``join`` takes part in one secure-aggregation round with a freshly personalized ``v``: only the masked
  update leaves the device (:func:`fedfer.agent.learning.update.round_contribution`).

Both refuse to learn from an untrained IFER head (:func:`fedfer.agent.daemon.preflight.require_trained_ifer`).
A :class:`JobRunner` runs a job's computation in a daemon thread and its network calls in an event loop that
:meth:`JobRunner.cancel` stops at once: a stopping agent neither waits for a training nor saves or sends
anything half-done. torch and gRPC are imported when a job runs, not when the learner starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedfer.agent.config import AgentConfig
from fedfer.agent.daemon.preflight import require_trained_ifer
from fedfer.agent.errors import ComponentUnavailableError
from fedfer.agent.federation.state import DeviceState
from fedfer.agent.learning.dp import DPConfig
from fedfer.agent.learning.ledger import PrivacyBudget, RoundBudget
from fedfer.agent.learning.update import RoundDPConfig, round_contribution
from fedfer.agent.store.device import (
    central_model,
    open_cache,
    save_central_model,
    save_personal_model,
    verified_sessions,
)
from fedfer.security.errors import FedferError, ValidationError

__all__ = [
    "BUDGET_FILE",
    "FEDERATION_DIR",
    "JOBS",
    "ROUND_BUDGET_FILE",
    "JobCancelledError",
    "JobRunner",
]

T = TypeVar("T")
_log = logging.getLogger(__name__)

# Inside the state directory.
FEDERATION_DIR = "federation"
BUDGET_FILE = "privacy-budget.json"
ROUND_BUDGET_FILE = "round-privacy-budget.json"


class JobCancelledError(FedferError):
    """A job was cancelled because the agent is stopping (nothing was sent or saved half-way)."""


class JobRunner:
    """Runs the learner's jobs and cancels the running one when the agent stops (see the module docstring)."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._running: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None
        self._computing: set[threading.Thread] = set()

    def run(self, kind: str, config: AgentConfig) -> dict[str, Any]:
        """Run job ``kind`` (a name in :data:`JOBS`) to its end; its result as plain data.

        Raises:
            ValidationError: no such job.
            JobCancelledError: :meth:`cancel` was called.
            FedferError: the job failed (its message says why).
        """
        job = JOBS.get(kind)
        if job is None:
            raise ValidationError("unknown job")
        return job(self, config)

    def computing(self) -> bool:
        """Whether a job's computation is still running (possibly abandoned by a cancelled job)."""
        with self._lock:
            return any(t.is_alive() for t in self._computing)

    def cancel(self) -> None:
        """Cancel the running job (the agent is stopping): its network calls end and its channel closes."""
        self._cancelled.set()
        with self._lock:
            entry = self._running
        if entry is not None:
            loop, task = entry
            with contextlib.suppress(RuntimeError):  # the loop already finished
                loop.call_soon_threadsafe(task.cancel)

    def run_cancellable(self, coro: Coroutine[Any, Any, T]) -> T:
        """``asyncio.run(coro)``, cancelled at once (``JobCancelledError``) by :meth:`cancel`."""

        async def main() -> T:
            task = asyncio.ensure_future(coro)
            with self._lock:
                self._running = (asyncio.get_running_loop(), task)
            if self._cancelled.is_set():
                task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                raise JobCancelledError("the job was cancelled: the agent is stopping") from None
            finally:
                with self._lock:
                    self._running = None

        return asyncio.run(main())

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
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
        with self._lock:
            self._computing.add(thread)
        thread.start()
        try:
            return await future
        finally:
            if not thread.is_alive():
                with self._lock:
                    self._computing.discard(thread)


def _cached_clips(config: AgentConfig) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """Features ``(T, 1280)`` float32 and IFER probabilities ``(T, K)`` of every cached session of 2+ verified
    frames, and what verification rejected (``records_rejected``, ``sessions_damaged``; logged too)."""
    cache = open_cache(config)
    features: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    rejected = {"records_rejected": 0, "sessions_damaged": 0}
    try:
        for session in verified_sessions(cache):
            rejected["records_rejected"] += session.rejected
            rejected["sessions_damaged"] += int(session.damaged)
            if len(session.records) < 2:
                continue
            features.append(np.stack([r.feature for r in session.records]).astype(np.float32))
            probs.append(np.stack([r.ifer_probs for r in session.records]).astype(np.float32))
    finally:
        cache.close()
    if rejected["sessions_damaged"]:
        _log.warning("cached records failed verification and are not used for learning", extra=rejected)
    if len(features) < config.learning.min_sessions:
        damage = ""
        if rejected["sessions_damaged"]:
            damage = f" ({rejected['records_rejected']} cached records failed verification)"
        raise ValidationError(
            f"personalization needs at least {config.learning.min_sessions} cached session(s) of 2+ frames; "
            f"{len(features)} available{damage}"
        )
    return features, probs, rejected


def _personalize_from(
    config: AgentConfig, central: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Personalize ``v`` from the ``central`` arrays on the cached sessions (DP-SGD when ``privacy.dp``)."""
    from fedfer.agent.learning.personalize import PersonalizeConfig, personalize
    from fedfer.agent.models.video import to_named_arrays

    features, probs, rejected = _cached_clips(config)
    privacy = config.privacy
    dp = budget = None
    if privacy.dp:
        dp = DPConfig(
            target_epsilon=privacy.target_epsilon or None,
            noise_multiplier=privacy.noise_multiplier or None,
            delta=float(privacy.delta),
            max_grad_norm=privacy.max_grad_norm,
        )
        budget = PrivacyBudget(
            path=config.state_dir / BUDGET_FILE, epsilon_limit=privacy.budget, delta=float(privacy.delta)
        )
    settings = PersonalizeConfig(
        per_class=config.learning.max_per_class,
        p_threshold=config.learning.confidence_threshold,
        lr=float(config.learning.lr),
        epochs=config.learning.epochs,
    )
    model, result = personalize(
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
        **rejected,
    }
    return to_named_arrays(model), summary


def _central_or_initial(config: AgentConfig) -> tuple[dict[str, np.ndarray], str]:
    """The last central ``v`` this device fetched, else a freshly initialized one."""
    from fedfer.agent.models.video import VideoModel, to_named_arrays

    central = central_model(config)
    if central is not None:
        return central
    return to_named_arrays(VideoModel(num_classes=config.learning.num_classes)), "initial"


def _personalize(runner: JobRunner, config: AgentConfig) -> dict[str, Any]:
    """Job ``personalize``: fine-tune ``v`` on the cached sessions; the result stays on the device."""
    require_trained_ifer(config)
    central, version = _central_or_initial(config)

    async def go() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return await runner.in_thread(_personalize_from, config, central)

    # Cancellable: a stopping agent does not wait for the training; nothing is saved unless it finished.
    arrays, summary = runner.run_cancellable(go())
    save_personal_model(config, arrays, {"base_version": version})
    return {"base_version": version, **summary}


def _round_privacy(config: AgentConfig) -> tuple[RoundDPConfig | None, RoundBudget | None]:
    """``(RoundDPConfig, RoundBudget)`` for ``privacy.round_dp`` (``(None, None)`` when it is off).

    Raises:
        PrivacyBudgetExceededError: the device's round budget cannot pay for another round.
    """
    privacy = config.privacy
    if not privacy.round_dp:
        return None, None
    delta = float(privacy.delta)
    if privacy.round_noise_multiplier > 0:
        dp = RoundDPConfig(
            clip_norm=float(privacy.round_clip_norm),
            noise_multiplier=float(privacy.round_noise_multiplier),
            num_clients=privacy.round_clients,
            delta=delta,
        )
    else:
        dp = RoundDPConfig.for_epsilon(
            epsilon=float(privacy.round_target_epsilon),
            clip_norm=float(privacy.round_clip_norm),
            num_clients=privacy.round_clients,
            delta=delta,
        )
    budget = RoundBudget(
        path=config.state_dir / ROUND_BUDGET_FILE, epsilon_limit=float(privacy.round_budget), delta=delta
    )
    budget.check(dp.noise_multiplier)
    return dp, budget


def _enrolled_state(config: AgentConfig) -> DeviceState:
    """The device's federation state, checked against ``[federation]`` (same aggregator, same CA)."""
    try:
        state = DeviceState.load(config.state_dir / FEDERATION_DIR)
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
    return state


def _join(runner: JobRunner, config: AgentConfig) -> dict[str, Any]:
    """Job ``join``: take part in one secure-aggregation round with a freshly personalized ``v``.

    The device must be enrolled (``fedfer-agent enroll --state <state_dir>/federation``). Within the round the
    central ``v`` of the round's base version is fetched, personalized on the cached sessions, and only the
    masked difference leaves the device: weighted by the number of clips used, or, with
    ``privacy.round_dp``, clipped in L2, with this device's share of the Gaussian noise and weight 1
    (:func:`fedfer.agent.learning.update.round_contribution`). A device whose round budget is spent is
    refused before it contacts the aggregator.
    """
    from fedfer.agent.federation.client import FederationClient, RoundOutcome

    require_trained_ifer(config)
    if not config.federation.server:
        raise ValidationError("federation.server is not configured: this device does not federate")
    round_dp, round_budget = _round_privacy(config)
    state = _enrolled_state(config)
    report: dict[str, Any] = {}
    holder: dict[str, FederationClient] = {}

    async def update_fn(base_version: str, dim: int) -> tuple[np.ndarray, int]:
        central = await holder["client"].fetch_model(base_version)
        base = {k: np.asarray(v, dtype=np.float32) for k, v in central.arrays.items()}
        save_central_model(config, base, central.version)
        personal, summary = await runner.in_thread(_personalize_from, config, base)
        if set(personal) != set(base) or summary["selected"] < 1:
            raise ValidationError("no cached clip passed the confidence threshold; nothing to contribute")
        if sum(a.size for a in base.values()) != dim:
            raise ValidationError("the personalized model does not match the round's model")
        update, weight, privacy_report = round_contribution(
            base,
            personal,
            order=list(base),
            examples=int(summary["selected"]),
            dp=round_dp,
            budget=round_budget,
        )
        report.update(summary, **privacy_report)
        return update, int(weight)

    async def go() -> RoundOutcome:
        async with FederationClient(state=state) as opened:
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
                save_central_model(config, arrays, latest.version)
                report["central_saved"] = str(latest.version)
            return outcome

    outcome = runner.run_cancellable(go())
    return {
        "round_id": int(outcome.round_id),
        "status": str(outcome.status),
        "model_version": str(outcome.model_version),
        "base_version": str(outcome.base_version),
        **report,
    }


#: The jobs the learner runs, by the name the control plane uses.
JOBS: dict[str, Callable[[JobRunner, AgentConfig], dict[str, Any]]] = {
    "join": _join,
    "personalize": _personalize,
}
