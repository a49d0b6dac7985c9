"""The worker → supervisor link: a job result is never lost to a full queue (real ZeroMQ, in process)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import zmq

from fedfer.agent.config import apply_path_overrides, parse_config
from fedfer.agent.daemon.wire import endpoint
from fedfer.agent.daemon.worker import Worker


class _Idle(Worker):
    role = "learner"

    def step(self) -> float:
        return 0.0


def test_a_job_result_is_kept_until_the_supervisor_link_takes_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    config = apply_path_overrides(parse_config(""), {"FEDFER_STATE_DIR": str(tmp_path)})
    context: zmq.Context[Any] = zmq.Context()
    worker = _Idle(config=config, run_dir=run, context=context)
    router = context.socket(zmq.ROUTER)
    try:
        # Nobody reads the link (a busy or stalled supervisor): it fills up; heartbeats are then skipped ...
        skipped = 0
        while worker.send_event({"type": "heartbeat"}):
            skipped += 1
        assert skipped >= 1000  # the link's high-water mark
        # ... but a job result is kept and sent again until the link takes it.
        worker.outbox.put({"type": "result", "job": "j1", "ok": True, "result": {"n": 1}})
        worker.flush_outbox()
        router.bind(endpoint(run, "workers"))
        results = []
        deadline = time.monotonic() + 20
        while not results and time.monotonic() < deadline:
            while router.poll(100, zmq.POLLIN):
                event = json.loads(router.recv_multipart()[1])
                if event["type"] == "result":
                    results.append(event)
            worker.flush_outbox()
        assert [(r["job"], r["ok"], r["result"]) for r in results] == [("j1", True, {"n": 1})]
        worker.flush_outbox()
        assert not router.poll(300, zmq.POLLIN)  # sent once, not again
    finally:
        router.close(linger=0)
        worker.close()
        context.destroy(linger=0)
