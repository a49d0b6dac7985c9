"""What the device keeps: features only in the encrypted cache, and the models derived from them.

* :mod:`~fedfer.agent.store.cache`: the encrypted feature cache (SQLite index, AES-256-GCM records, one data
  key per session, crypto-shredding);
* :mod:`~fedfer.agent.store.keys`: where its key-encryption key lives (a 0600 file or the OS keyring);
* :mod:`~fedfer.agent.store.sink`: the learner's record sink (records → sessions, each file stored once);
* :mod:`~fedfer.agent.store.device`: the stores of one device opened from its configuration, the control
  plane's cache commands, the personalized and central ``v``.
"""

__all__: list[str] = []
