"""``fedfer-agent run``: the supervisor and its worker processes, joined by ZeroMQ.

* :mod:`~fedfer.agent.daemon.supervisor`: starts, watches, restarts and drains the workers; serves the
  control socket;
* :mod:`~fedfer.agent.daemon.worker`: what every worker shares (supervisor link, heartbeats, drain);
  :mod:`~fedfer.agent.daemon.capture_worker`, :mod:`~fedfer.agent.daemon.vision_worker`,
  :mod:`~fedfer.agent.daemon.learner_worker`: the three roles; :mod:`~fedfer.agent.daemon.workers`: a worker
  process's entry point;
* :mod:`~fedfer.agent.daemon.wire`: every message between the daemon's processes (frames, records, end
  markers, events and commands) and their sockets;
* :mod:`~fedfer.agent.daemon.jobs`: the learner's jobs (``personalize``, ``join``) and their cancellation;
* :mod:`~fedfer.agent.daemon.control`: the local control plane (requests, replies, the client);
* :mod:`~fedfer.agent.daemon.preflight`, :mod:`~fedfer.agent.daemon.lock`,
  :mod:`~fedfer.agent.daemon.logs`: start-up warnings, the state-directory lock, redacted JSON logs.

The frame path: capture worker → (wire: frame) → vision worker → (wire: record) → learner worker →
:mod:`fedfer.agent.store.sink`.
"""

__all__: list[str] = []
