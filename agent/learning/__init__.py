"""Learning on the device: the personalized ``v`` and what a device contributes to a round.

* :mod:`~fedfer.agent.learning.personalize`: unsupervised personalization of ``v`` on IFER pseudo labels
  (Salman & Busso, ICMI 2022), optionally under DP-SGD;
* :mod:`~fedfer.agent.learning.dp`: DP-SGD settings and Opacus' RDP arithmetic;
* :mod:`~fedfer.agent.learning.update`: the round update ``Δv``, with optional user-level DP;
* :mod:`~fedfer.agent.learning.ledger`: the privacy ledger that refuses what the budget cannot pay for.

Central (offline) training is :mod:`fedfer.agent.training`.
"""

__all__: list[str] = []
