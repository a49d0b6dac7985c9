"""``fedfer-agent`` commands of the daemon area: ``run`` and the control-plane commands.

``run`` starts the supervisor in the foreground (systemd/launchd keep it running). The other commands talk
to the running agent over its private control socket; they print human-readable text by default and the
raw result with ``--json``. This is an entry point: it is the only place that reads the environment
(``FEDFER_CONFIG``, ``FEDFER_STATE_DIR``, ``FEDFER_ASSETS``; paths only).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from fedfer.agent.config import (
    ENV_CONFIG,
    ENV_STATE_DIR,
    AgentConfig,
    ConfigError,
    apply_path_overrides,
    load_config,
)
from fedfer.agent.daemon.control import ControlClient, ControlError

_CONTROL_COMMANDS = {
    "status": "show the agent's workers, counters and jobs",
    "sessions": "list the cached sessions",
    "forget": "delete one cached session and destroy its key",
    "purge": "delete every cached session and destroy every key",
    "personalize": "start personalizing the video model on the cached sessions",
    "join": "start joining a federated round",
    "pause": "stop capturing (releases the camera)",
    "resume": "start capturing again",
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help=f"TOML configuration file (default: ${ENV_CONFIG})")
    parser.add_argument("--state-dir", type=Path, help=f"state directory (default: ${ENV_STATE_DIR})")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's sub-commands to ``sub``."""
    run = sub.add_parser("run", help="run the agent (supervisor and workers) in the foreground")
    _add_common(run)
    run.set_defaults(handler=_run)
    prov = sub.add_parser(
        "provision", help="install verified model files (and an IFER export) into a service's assets folder"
    )
    prov.add_argument(
        "--to", type=Path, required=True, help="the assets folder (the service's FEDFER_ASSETS)"
    )
    prov.add_argument("--from", dest="source", type=Path, help="folder laid out like ../shared (models/...)")
    group = prov.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--ifer", type=Path, help="IFER export (manifest or folder) from `fedfer-agent train-ifer`"
    )
    group.add_argument(
        "--without-ifer",
        action="store_true",
        help="no trained IFER head: personalize and join will be refused",
    )
    group.add_argument(
        "--check", action="store_true", help="only verify what an earlier run installed in --to"
    )
    prov.set_defaults(handler=_provision)
    for name, text in _CONTROL_COMMANDS.items():
        if name in sub.choices:
            # Another area already registered this name; keep the CLI usable (the control plane itself
            # still accepts the command) rather than fail every command with an argparse conflict.
            continue
        parser = sub.add_parser(name, help=text)
        _add_common(parser)
        parser.add_argument("--json", action="store_true", help="print the raw JSON result")
        parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the agent")
        if name == "forget":
            parser.add_argument("id", help="session id (see `fedfer-agent sessions`)")
        if name == "purge":
            parser.add_argument("--yes", action="store_true", help="confirm deleting every session")
        if name in ("personalize", "join"):
            parser.add_argument("--wait", action="store_true", help="wait for the job to finish")
        parser.set_defaults(handler=_control, control=name)


def resolve_config(config_path: Path | None, state_dir: Path | None) -> tuple[AgentConfig, Path | None]:
    """Load the configuration named by ``--config`` or ``$FEDFER_CONFIG`` (else defaults) with path overrides.

    Returns:
        The configuration and the file it came from (``None`` for built-in defaults).
    """
    environ = dict(os.environ)
    if config_path is None and environ.get(ENV_CONFIG):
        config_path = Path(environ[ENV_CONFIG])
    config = load_config(config_path) if config_path is not None else AgentConfig()
    if state_dir is not None:
        environ[ENV_STATE_DIR] = str(state_dir)
    return apply_path_overrides(config, environ), config_path


def _run(args: argparse.Namespace) -> int:
    from fedfer.agent.daemon.logs import configure_logging
    from fedfer.agent.daemon.supervisor import Supervisor

    config, config_path = resolve_config(args.config, args.state_dir)
    configure_logging(role="supervisor", level=config.agent.log_level, log_file=config.agent.log_file)
    environ = dict(os.environ)
    if args.state_dir is not None:
        environ[ENV_STATE_DIR] = str(args.state_dir)
    return Supervisor(config=config, config_path=config_path, environ=environ).run()


def _provision(args: argparse.Namespace) -> int:
    from fedfer.agent.models.provision import check_assets, provision

    if args.check:
        result = check_assets(args.to)
    elif args.source is None:
        raise ConfigError("--from is required: the folder holding the model files (laid out like ../shared)")
    else:
        result = provision(
            source=args.source, assets=args.to, ifer=args.ifer, require_tflite=args.without_ifer
        )
    print(json.dumps(result, sort_keys=True))
    return 0


def _control(args: argparse.Namespace) -> int:
    config, _ = resolve_config(args.config, args.state_dir)
    if args.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    request: dict[str, Any] = {}
    if args.control == "forget":
        request["id"] = args.id
    if args.control == "purge":
        if not args.yes:
            raise ConfigError("purge deletes every cached session: add --yes to confirm")
        request["confirm"] = True
    client = ControlClient(config.state_dir, timeout_s=args.timeout)
    result = client.request(args.control, **request)
    if getattr(args, "wait", False):
        result = _wait_for_job(client, str(result.get("job")))
        print(json.dumps(result, indent=2, sort_keys=True) if args.json else _human_job(result))
        return 0 if result.get("state") == "done" else 1
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else _human(args.control, result))
    return 0


def _wait_for_job(client: ControlClient, job_id: str) -> dict[str, Any]:
    """Poll the agent's status until job ``job_id`` is no longer running; return its record."""
    while True:
        jobs = [j for j in client.request("status").get("jobs", []) if j.get("id") == job_id]
        if not jobs:
            raise ControlError(f"the agent no longer knows job {job_id}")
        if jobs[0].get("state") != "running":
            job: dict[str, Any] = jobs[0]
            return job
        time.sleep(0.5)


def _human_job(job: dict[str, Any]) -> str:
    if job.get("state") != "done":
        return f"{job.get('kind')} failed: {job.get('error')}"
    result = job.get("result") or {}
    text = f"{job.get('kind')} done: " + ", ".join(f"{k} {v}" for k, v in sorted(result.items()))
    return text + "".join(f"\n  warning: {w}" for w in _job_warnings(result))


def _job_warnings(result: dict[str, Any]) -> list[str]:
    """What a job's result says went wrong on the way (cached records that failed verification)."""
    rejected, damaged = result.get("records_rejected", 0), result.get("sessions_damaged", 0)
    if not damaged:
        return []
    return [
        f"{rejected} cached record(s) of {damaged} damaged session(s) failed verification and were not used "
        "(see `fedfer-agent sessions`)"
    ]


def _human(command: str, result: dict[str, Any]) -> str:
    if command == "status":
        return _human_status(result)
    if command == "sessions":
        return _human_sessions(result.get("sessions", []))
    if command in ("personalize", "join"):
        return f"{command} started (job {result.get('job')}); follow it with `fedfer-agent status`"
    if command == "forget":
        deleted = bool(result.get("personal_model_deleted"))
        extra = "; the personalized model trained on it was deleted" if deleted else ""
        return f"session {result.get('forgotten')} forgotten{extra}"
    if command in ("pause", "resume"):
        return "capture paused" if result.get("paused") else "capture running"
    return ", ".join(f"{k}: {v}" for k, v in sorted(result.items())) or "done"


def _human_sessions(sessions: list[Any]) -> str:
    """One line per session: id, when, stored and verified frames, sealed or open, and a mark if damaged."""
    if not sessions:
        return "no cached sessions"
    lines = []
    damaged = rejected = 0
    for s in sessions:
        if not isinstance(s, dict):
            lines.append(str(s))
            continue
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(s.get("created", 0))))
        line = (
            f"{s.get('id')}  {created}  {s.get('frames')} frames stored, {s.get('verified')} verified, "
            f"{'sealed' if s.get('sealed') else 'open'}, {s.get('bytes')} bytes"
        )
        if s.get("damaged"):
            damaged += 1
            rejected += int(s.get("rejected", 0))
            why = (
                "its data key failed verification"
                if s.get("key_failed")
                else f"{s.get('rejected')} record(s) failed verification or are missing"
            )
            line += f"  DAMAGED: {why}"
        lines.append(line)
    total = f"{len(sessions)} cached session(s)"
    if damaged:
        total += f", {damaged} DAMAGED ({rejected} record(s) rejected, never used)"
    return "\n".join([total, *lines])


def _capture_state(status: dict[str, Any]) -> str:
    """What capture is doing, in a few words, for the first line of ``status``."""
    if status.get("paused"):
        return "paused"
    capture = status.get("workers", {}).get("capture", {})
    stats = capture.get("stats", {})
    if capture.get("state") == "failed":
        return "capture FAILED (gave up after repeated crashes; `resume` tries again)"
    if stats.get("source_error"):
        return "capture WAITING: its source fails (retrying)"
    if stats.get("source_done"):
        return "capture finished (every file read)"
    return "capturing"


def _human_status(status: dict[str, Any]) -> str:
    lines = [
        f"fedfer agent pid {status.get('pid')}, up {status.get('uptime_s', 0):.0f} s, "
        f"{_capture_state(status)}, config generation {status.get('config_generation')}",
    ]
    for role, worker in sorted(status.get("workers", {}).items()):
        stats = worker.get("stats", {})
        counters = ", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if isinstance(v, int | float))
        lines.append(
            f"  {role:<8} {worker.get('state', '?'):<11} pid {worker.get('pid')} "
            f"restarts {worker.get('restarts', 0)}" + (f"  [{counters}]" if counters else "")
        )
        if "unavailable" in stats:
            lines.append(f"           unavailable: {stats['unavailable']}")
        if stats.get("source_error"):
            in_a_row = stats.get("source_failures", 0)
            lines.append(f"           source error: {stats['source_error']} ({in_a_row} in a row)")
        failed = stats.get("failed_files") or []
        if failed:
            lines.append(
                f"           files skipped, cannot be read ({stats.get('files_failed', len(failed))}):"
            )
            lines.extend(
                f"             {f.get('file')}: {f.get('reason')}" for f in failed if isinstance(f, dict)
            )
    drops = status.get("drops", {})
    lines.append(
        f"  dropped: {drops.get('frames', 0)} frames, {drops.get('records', 0)} records, "
        f"{drops.get('disk_full', 0)} records refused by a full disk"
    )
    for warning in status.get("warnings", []):
        lines.append(f"  warning: {warning}")
    for job in status.get("jobs", [])[-3:]:
        lines.append(f"  job {job.get('id')} {job.get('kind')}: {job.get('state')}")
        lines.extend(f"    warning: {w}" for w in _job_warnings(job.get("result") or {}))
    return "\n".join(lines)
