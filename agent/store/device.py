"""One device's stored state, opened from its configuration: the encrypted cache and the models it keeps.

* :func:`open_cache` opens the cache in ``<state_dir>/cache`` with the configured retention and key store;
  :func:`cache_sessions`, :func:`cache_forget` and :func:`cache_purge` serve the control plane's commands.
* :func:`verified_sessions` reads every session through verification, for ``sessions`` and for learning
  alike: what fails (tampered, swapped, moved or cut records, an altered seal or data key) is left out and
  counted, never used.
* The personalized ``v`` is derived from the user's data: it lives only in the cache, as the named blob
  :data:`PERSONAL_BLOB` (:func:`save_personal_model`, :func:`load_personal_model`), and goes with the
  sessions it was trained on. The central ``v`` the device last fetched is public and kept as an exported
  model in ``<state_dir>/models`` (:func:`central_model`, :func:`save_central_model`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfer.agent.config import AgentConfig
from fedfer.agent.errors import ComponentUnavailableError
from fedfer.agent.files import ensure_private_dir
from fedfer.agent.models.export import load_exported, pack_exported, save_exported, unpack_exported
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.cache import BlobNotFoundError, FeatureCache, SessionInfo, SessionNotFoundError
from fedfer.agent.store.keys import key_store_for
from fedfer.security.errors import FedferError, IntegrityError

__all__ = [
    "CACHE_DIR",
    "CENTRAL_MODEL",
    "MODELS_DIR",
    "PERSONAL_BLOB",
    "VerifiedSession",
    "cache_forget",
    "cache_purge",
    "cache_sessions",
    "central_model",
    "load_personal_model",
    "open_cache",
    "save_central_model",
    "save_personal_model",
    "verified_sessions",
]

# Where the daemon keeps things inside the state directory.
CACHE_DIR = "cache"
MODELS_DIR = "models"
#: The exported central ``v`` in ``models/`` (``central.json`` + ``central.npz``).
CENTRAL_MODEL = "central"
#: The cache blob that holds the personalized ``v`` (never a plain file: it is derived from the user's data).
PERSONAL_BLOB = "personal-v"


def open_cache(config: AgentConfig) -> FeatureCache:
    """Open the encrypted feature cache in ``<state_dir>/cache`` with the configured retention and key store.

    Several processes may open it at once (the learner writes, the supervisor lists and forgets). The key
    store follows ``cache.key_store`` (:func:`fedfer.agent.store.keys.key_store_for`): with ``auto`` a new
    cache keeps its KEK in the OS keyring when one is usable, else in a 0600 file; an existing key file is
    kept.

    Raises:
        ComponentUnavailableError: the cache's key store is unusable.
    """
    directory = config.state_dir / CACHE_DIR
    try:
        key_store = key_store_for(directory, config.cache.key_store)
    except FedferError as exc:
        raise ComponentUnavailableError(f"the cache key store is unusable ({exc})") from None
    return FeatureCache(
        directory,
        key_store=key_store,
        max_age_s=config.cache.retention_days * 86_400.0,
        max_bytes=config.cache.max_bytes,
    )


@dataclass(frozen=True, slots=True, repr=False)
class VerifiedSession:
    """One cached session as verification found it.

    Attributes:
        info: what the index says (``info.frames``: the frames it claims are stored).
        records: the frame records that verified, in order.
        rejected: records that failed verification or are missing (frames, and the seal of a sealed
            session); every stored record when ``key_failed``.
        key_failed: the session's data key failed verification, so nothing of it can be read.
    """

    info: SessionInfo
    records: tuple[FrameRecord, ...]
    rejected: int
    key_failed: bool = False

    def __repr__(self) -> str:
        info = self.info
        return (
            f"VerifiedSession({info.session_id}, frames={info.frames}, verified={len(self.records)}, "
            f"rejected={self.rejected}, key_failed={self.key_failed})"
        )

    @property
    def damaged(self) -> bool:
        """Whether anything of the session failed verification."""
        return self.key_failed or self.rejected > 0

    def summary(self) -> dict[str, Any]:
        """The session as ``sessions`` lists it: ids, times, counts, sizes; never its contents."""
        info = self.info
        return {
            "id": info.session_id,
            "created": info.created,
            "frames": info.frames,
            "verified": len(self.records),
            "rejected": self.rejected,
            "damaged": self.damaged,
            "key_failed": self.key_failed,
            "bytes": info.bytes,
            "sealed": info.sealed,
        }


def verified_sessions(cache: FeatureCache) -> Iterator[VerifiedSession]:
    """Every session of ``cache``, oldest first, read through verification (see :class:`VerifiedSession`).

    The cache logs each damaged session (its id and counts, never contents). Verifying costs about 20 µs a
    record (some 2 s for 100,000 frames) on a small CPU.
    """
    for info in cache.sessions():
        try:
            contents = cache.recover_session(info.session_id)
        except SessionNotFoundError:
            continue  # forgotten meanwhile (another process, retention)
        except IntegrityError:  # its data key does not open: every stored record is lost
            yield VerifiedSession(info, (), info.frames, key_failed=True)
            continue
        yield VerifiedSession(info, tuple(r for _, r in contents.records), len(contents.failed))


def cache_sessions(config: AgentConfig) -> list[dict[str, Any]]:
    """The cached sessions, verified: ids, creation times, stored and verified frame counts, sizes, whether
    damaged (:meth:`VerifiedSession.summary`); never their contents."""
    cache = open_cache(config)
    try:
        return [session.summary() for session in verified_sessions(cache)]
    finally:
        cache.close()


def cache_forget(config: AgentConfig, session_id: str) -> dict[str, Any]:
    """Delete one session and destroy its key (crypto-shredding; the cache also rotates its KEK).

    The personalized ``v`` was trained on the cached sessions, so it goes too: nothing learned from the
    forgotten session stays on the device (the next ``personalize`` trains a new one on what is left).
    """
    cache = open_cache(config)
    try:
        cache.forget(session_id)
        dropped = cache.delete_blob(PERSONAL_BLOB)
    finally:
        cache.close()
    dropped = _drop_plaintext_personal(config) or dropped
    return {"forgotten": session_id, "personal_model_deleted": dropped}


def cache_purge(config: AgentConfig) -> dict[str, Any]:
    """Delete every session and the personalized ``v``, and replace the key-encryption key."""
    cache = open_cache(config)
    try:
        count = len(cache.sessions())
        cache.purge()
    finally:
        cache.close()
    _drop_plaintext_personal(config)
    return {"purged": count}


def load_personal_model(config: AgentConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The personalized ``v`` (named arrays and manifest) from the encrypted cache; None if there is none.

    Raises:
        IntegrityError: the stored model failed verification.
    """
    cache = open_cache(config)
    try:
        data = cache.get_blob(PERSONAL_BLOB)
    except BlobNotFoundError:
        return None
    finally:
        cache.close()
    arrays, meta = unpack_exported(data)
    return dict(arrays), dict(meta)


def save_personal_model(config: AgentConfig, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Keep the personalized ``v`` only inside the encrypted cache (it is derived from the user's data)."""
    manifest = {"kind": "v", "classes": config.learning.num_classes, **meta}
    cache = open_cache(config)
    try:
        cache.put_blob(PERSONAL_BLOB, pack_exported("personal", arrays, manifest))
    finally:
        cache.close()
    _drop_plaintext_personal(config)


def _drop_plaintext_personal(config: AgentConfig) -> bool:
    """Remove a personalized ``v`` that an earlier version stored in the clear (``models/personal.*``)."""
    removed = False
    for suffix in (".npz", ".json"):
        path = config.state_dir / MODELS_DIR / f"personal{suffix}"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed = True
    return removed


def central_model(config: AgentConfig) -> tuple[dict[str, np.ndarray], str] | None:
    """The last central ``v`` this device fetched (named arrays and version); ``None`` if it has none."""
    manifest = config.state_dir / MODELS_DIR / f"{CENTRAL_MODEL}.json"
    if not manifest.is_file():
        return None
    arrays, meta = load_exported(manifest)
    return dict(arrays), str(meta.get("version", "central"))


def save_central_model(config: AgentConfig, arrays: dict[str, np.ndarray], version: str) -> None:
    """Keep the central ``v`` of ``version`` (public: every device receives it) in ``<state>/models``."""
    folder = ensure_private_dir(config.state_dir / MODELS_DIR)
    manifest = {"kind": "v", "classes": config.learning.num_classes, "version": version}
    save_exported(folder, CENTRAL_MODEL, arrays, manifest)
