"""The agent's worker processes: capture, vision and learner, joined by ZeroMQ.

Each worker is its own process (``python -m fedfer.agent.daemon.workers --role ROLE --run-dir DIR``) started
by the supervisor: :class:`~fedfer.agent.daemon.capture_worker.CaptureWorker`,
:class:`~fedfer.agent.daemon.vision_worker.VisionWorker` and
:class:`~fedfer.agent.daemon.learner_worker.LearnerWorker`. The wiring, all IPC sockets inside the private
``run/`` directory (the messages are :mod:`fedfer.agent.daemon.wire`)::

    capture ──PUSH(frames.ipc, HWM)──► vision ──PUSH(records.ipc, HWM)──► learner (writes the encrypted cache)
    every worker ◄──DEALER/ROUTER(workers.ipc)──► supervisor: hello, heartbeats, commands, job results

Queues are bounded (``daemon.queue_hwm`` messages each). What happens when one is full depends on the source:

* live (camera, stream, looping file): capture drops the frame, vision drops the record after a bounded
  wait; both are counted (``frames_dropped``, ``records_dropped``; ``status`` sums them under ``drops``);
* finite file source: nothing is dropped. Capture and vision wait (in bounded steps, heartbeating) until there
  is room, and an end marker follows each file through the pipeline; the learner marks the file done in the
  ledger (:mod:`fedfer.agent.capture.ledger`) only when every record vision sent for it is stored.

Frames travel only in RAM. Drain contract on SIGTERM (the supervisor stops capture, then vision, then the
learner, all within ``daemon.drain_timeout_s``): capture stops reading at once and the frames it had queued
still go out; vision receives every one of them (``frames_in`` reaches capture's ``frames_sent``) and runs
the vision stage on each (``frames_discarded`` counts those it could not, e.g. models unavailable); the
learner stores every record vision sent (``records_in`` reaches vision's ``records_sent``). The supervisor's
last log line (``agent stopped``) reports what the bound cut off (``vision_unprocessed``,
``records_unstored``; zero after a complete drain). A worker whose supervisor dies exits too (Linux
parent-death signal, plus a parent-pid check everywhere else).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from fedfer.agent.config import config_from_dict
from fedfer.agent.daemon.capture_worker import CaptureWorker
from fedfer.agent.daemon.learner_worker import LearnerWorker
from fedfer.agent.daemon.logs import capture_native_stderr, configure_logging
from fedfer.agent.daemon.vision_worker import VisionWorker, prepare_vision_runtime
from fedfer.agent.daemon.worker import CONFIG_FILE, Worker, set_parent_death_signal
from fedfer.security.errors import FedferError

__all__ = ["main"]

_log = logging.getLogger(__name__)

_WORKERS: dict[str, type[Worker]] = {
    "capture": CaptureWorker,
    "vision": VisionWorker,
    "learner": LearnerWorker,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one worker process (started by the supervisor, not by people)."""
    parser = argparse.ArgumentParser(prog="fedfer-agent-worker")
    parser.add_argument("--role", choices=sorted(_WORKERS), required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--paused", action="store_true", help="start paused (capture)")
    parser.add_argument("--supervisor-pid", type=int, default=None, help="the process that started it")
    args = parser.parse_args(argv)
    set_parent_death_signal()
    if args.supervisor_pid is not None and os.getppid() != args.supervisor_pid:
        # The supervisor died before the death signal was armed (it never fires then): do not linger.
        return 1
    if args.role == "vision":
        prepare_vision_runtime()
    # The supervisor coordinates shutdown: a terminal's Ctrl-C reaches it, not each worker on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = config_from_dict(json.loads((args.run_dir / CONFIG_FILE).read_text(encoding="utf-8")))
    stream = capture_native_stderr()
    configure_logging(
        role=args.role, level=config.agent.log_level, log_file=config.agent.log_file, stream=stream
    )
    context: zmq.Context[Any] = zmq.Context()
    try:
        worker = _WORKERS[args.role](config=config, run_dir=args.run_dir, context=context)
        worker.paused = args.paused
        signal.signal(signal.SIGTERM, worker.request_stop)
        _log.info("worker started")
        status = worker.run()
        if worker.abandoned:
            # Interpreter shutdown could wait on the abandoned computation (or its libraries' exit hooks);
            # everything worth keeping is closed already, so leave now.
            context.destroy(linger=1000)
            logging.shutdown()
            os._exit(status)
        return status
    except FedferError as exc:
        _log.error("worker failed: %s", str(exc))
        return 3
    except Exception:  # a bug: log it as JSON (type and message only) and let the supervisor restart us
        _log.exception("worker crashed")
        return 1
    finally:
        context.destroy(linger=1000)


if __name__ == "__main__":
    raise SystemExit(main())
