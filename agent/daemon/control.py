"""The local control plane: ZeroMQ REQ/REP over an IPC socket in the private ``run/`` directory.

Only the service user can reach the socket: ``run/`` is 0700 (checked by both ends) and the socket file is
0600. A request is one UTF-8 JSON object ``{"v": 1, "cmd": NAME, "args": {...}}`` of at most
``daemon.control_max_bytes`` bytes; :func:`parse_request` checks it against the schema and every malformed
request gets an error reply (``{"ok": false, "error": ...}``), never a crash. Replies are
``{"ok": true, "result": {...}}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from fedfer.agent.files import ensure_private_dir
from fedfer.security.errors import FedferError

__all__ = [
    "COMMANDS",
    "PROTOCOL_VERSION",
    "ControlClient",
    "ControlError",
    "Request",
    "error_reply",
    "parse_request",
    "run_dir",
]

PROTOCOL_VERSION = 1
_SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class ControlError(FedferError):
    """A control request is malformed, was refused, or no agent answered."""


def _no_args(args: Mapping[str, Any]) -> dict[str, Any]:
    if args:
        raise ControlError(f"unexpected argument(s): {', '.join(sorted(map(str, args)))[:200]}")
    return {}


def _forget_args(args: Mapping[str, Any]) -> dict[str, Any]:
    if set(args) != {"id"}:
        raise ControlError("forget takes exactly one argument: id")
    session_id = args["id"]
    if type(session_id) is not str or not _SESSION_ID.fullmatch(session_id):
        raise ControlError("id must be a session id (letters, digits, '_.:-', at most 128)")
    return {"id": session_id}


def _purge_args(args: Mapping[str, Any]) -> dict[str, Any]:
    if set(args) != {"confirm"} or args["confirm"] is not True:
        raise ControlError("purge needs confirm=true")
    return {"confirm": True}


#: Command name → argument checker (returns the normalized arguments or raises ControlError).
COMMANDS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "forget": _forget_args,
    "join": _no_args,
    "pause": _no_args,
    "personalize": _no_args,
    "purge": _purge_args,
    "resume": _no_args,
    "sessions": _no_args,
    "status": _no_args,
}


@dataclass(frozen=True, slots=True)
class Request:
    """A validated control request."""

    cmd: str
    args: dict[str, Any]


def parse_request(frames: list[bytes], *, max_bytes: int) -> Request:
    """Validate one raw request (the frames of one ZeroMQ message).

    Raises:
        ControlError: wrong frame count, too large, not UTF-8 JSON, not an object, wrong version, unknown
            command, unknown keys, or arguments that fail the command's schema.
    """
    if len(frames) != 1:
        raise ControlError("a request is exactly one message frame")
    raw = frames[0]
    if len(raw) > max_bytes:
        raise ControlError(f"request larger than {max_bytes} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ControlError("request is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise ControlError("request must be a JSON object")
    extra = set(data) - {"v", "cmd", "args"}
    if extra:
        raise ControlError(f"unknown request field(s): {', '.join(sorted(extra))[:200]}")
    if data.get("v") != PROTOCOL_VERSION or type(data.get("v")) is not int:
        raise ControlError(f"request field v must be {PROTOCOL_VERSION}")
    cmd = data.get("cmd")
    if type(cmd) is not str or cmd not in COMMANDS:
        raise ControlError(f"unknown command (known: {', '.join(sorted(COMMANDS))})")
    args = data.get("args", {})
    if not isinstance(args, dict):
        raise ControlError("request field args must be an object")
    return Request(cmd=cmd, args=COMMANDS[cmd](args))


def error_reply(message: str) -> bytes:
    """The wire form of an error reply."""
    return json.dumps({"ok": False, "error": message}).encode("utf-8")


def run_dir(state_dir: Path) -> Path:
    """The private directory holding the agent's sockets (created 0700 and verified)."""
    ensure_private_dir(state_dir)
    return ensure_private_dir(state_dir / "run")


class ControlClient:
    """Send control requests to the agent running on ``state_dir``.

    Args:
        state_dir: the agent's state directory.
        timeout_s: how long to wait for a reply.
    """

    def __init__(self, state_dir: Path, *, timeout_s: float = 10.0) -> None:
        if timeout_s <= 0:
            raise ControlError("timeout_s must be positive")
        self.state_dir = state_dir
        self.timeout_s = timeout_s

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one command and return its result.

        Raises:
            ControlError: no agent is running, it did not answer in time, or it answered with an error.
            InsecurePathError: the socket directory is not private.
        """
        return self.request_raw(json.dumps({"v": PROTOCOL_VERSION, "cmd": cmd, "args": args}).encode("utf-8"))

    def request_raw(self, payload: bytes) -> dict[str, Any]:
        """Send ``payload`` as is (tests use this for malformed requests) and return the result."""
        run = self.state_dir / "run"
        socket_path = run / "control.ipc"
        if not socket_path.exists():
            raise ControlError(f"no fedfer agent is running on state directory {self.state_dir}")
        ensure_private_dir(run)
        context: zmq.Context[Any] = zmq.Context.instance()
        sock = context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(f"ipc://{socket_path}")
            sock.send(payload)
            if not sock.poll(int(self.timeout_s * 1000), zmq.POLLIN):
                raise ControlError(
                    f"the agent on {self.state_dir} did not answer within {self.timeout_s:g} s"
                )
            raw = sock.recv()
        finally:
            sock.close()
        try:
            reply = json.loads(raw)
        except ValueError:
            raise ControlError("the agent sent a malformed reply") from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ControlError("the agent sent a malformed reply")
        if reply["ok"] is not True:
            raise ControlError(str(reply.get("error", "request refused")))
        result = reply.get("result", {})
        return result if isinstance(result, dict) else {"value": result}
