"""The OS-keyring key store, through a stand-in ``keyring`` module (the package is not installed here).

The stand-in has keyring's API surface that the store uses (``get_password``, ``set_password``,
``delete_password``, ``get_keyring``, ``errors.PasswordDeleteError`` / ``errors.KeyringError``) and keeps
entries in a dict, so what the store writes can be inspected.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfer.agent.store.cache import KEY_FILE_NAME, FeatureCache
from fedfer.agent.store.keys import (
    FileKeyStore,
    KeyringKeyStore,
    KeyStoreError,
    default_key_store,
    key_store_for,
)
from fedfer.security.envelope import KeyEncryptionKey
from fedfer.security.errors import ValidationError
from tests.agent.test_cache import make_records, same


class _PasswordDeleteError(Exception):
    pass


class _KeyringError(Exception):
    pass


class FakeKeyring(types.ModuleType):
    """A ``keyring`` module whose backend lives in ``entries``; ``backend_module`` names its backend."""

    def __init__(self, backend_module: str = "keyring.backends.SecretService") -> None:
        super().__init__("keyring")
        self.entries: dict[tuple[str, str], str] = {}
        self.errors = types.SimpleNamespace(
            PasswordDeleteError=_PasswordDeleteError, KeyringError=_KeyringError
        )
        self.backend = type("Keyring", (), {"__module__": backend_module})()
        self.refuse = False
        self.forgetful = False

    def get_keyring(self) -> object:
        return self.backend

    def get_password(self, service: str, account: str) -> str | None:
        return self.entries.get((service, account))

    def set_password(self, service: str, account: str, value: str) -> None:
        if self.refuse:
            raise _KeyringError("locked")
        if not self.forgetful:
            self.entries[(service, account)] = value

    def delete_password(self, service: str, account: str) -> None:
        if (service, account) not in self.entries:
            raise _PasswordDeleteError("absent")
        del self.entries[(service, account)]


@pytest.fixture
def keyring() -> Iterator[FakeKeyring]:
    fake = FakeKeyring()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "keyring", fake)
        yield fake


def test_keyring_store_saves_loads_and_destroys(keyring: FakeKeyring) -> None:
    store = KeyringKeyStore(account="/var/lib/fedfer/cache")
    assert store.load() == []
    keys = [KeyEncryptionKey.generate(), KeyEncryptionKey.generate()]
    store.save(keys)
    assert [k.fingerprint for k in store.load()] == [k.fingerprint for k in keys]
    ((service, account), value) = next(iter(keyring.entries.items()))
    assert (service, account) == ("fedfer-feature-cache", "/var/lib/fedfer/cache")
    assert keys[0].dangerously_export_plaintext() not in value.encode("latin-1")  # base64 in JSON, not raw
    assert value not in repr(store)
    store.save(keys[1:])
    assert [k.fingerprint for k in store.load()] == [keys[1].fingerprint]
    store.destroy()
    assert keyring.entries == {} and store.load() == []
    store.destroy()  # idempotent: an absent entry is not an error
    with pytest.raises(ValidationError):
        store.save([])


def test_keyring_store_errors_are_clear(keyring: FakeKeyring) -> None:
    store = KeyringKeyStore(account="c")
    keyring.entries[("fedfer-feature-cache", "c")] = "not json"
    with pytest.raises(KeyStoreError, match="malformed"):
        store.load()
    keyring.entries[("fedfer-feature-cache", "c")] = '["AAAA"]'  # a key of the wrong length
    with pytest.raises(KeyStoreError, match="malformed"):
        store.load()
    keyring.entries.clear()
    keyring.refuse = True
    with pytest.raises(KeyStoreError, match="refused to store"):
        store.save([KeyEncryptionKey.generate()])
    keyring.refuse, keyring.forgetful = False, True  # a backend that accepts and drops (like "null")
    with pytest.raises(KeyStoreError, match="did not keep"):
        store.save([KeyEncryptionKey.generate()])
    with pytest.raises(ValidationError):
        KeyringKeyStore(account="")


def test_cache_on_the_keyring_round_trips_rotates_and_leaves_no_key_file(
    keyring: FakeKeyring, tmp_path: Path
) -> None:
    directory = tmp_path / "cache"
    records = make_records(4)
    with FeatureCache(directory, key_store=KeyringKeyStore(account=str(directory))) as cache:
        doomed, kept = cache.begin_session(), cache.begin_session()
        cache.append_batch(doomed, records)
        cache.append_batch(kept, records)
        before = dict(keyring.entries)
        cache.forget(doomed)  # rotates the KEK: the keyring entry is replaced
        assert keyring.entries != before and len(keyring.entries) == 1
    assert not (directory / KEY_FILE_NAME).exists()
    with FeatureCache(directory, key_store=KeyringKeyStore(account=str(directory))) as again:
        assert all(same(a, b) for a, b in zip(again.read_session(kept), records, strict=True))
    # A keyring that refuses the key: the new cache is refused clearly, and nothing is half-created.
    keyring.refuse = True
    with pytest.raises(KeyStoreError, match="refused"):
        FeatureCache(tmp_path / "other", key_store=KeyringKeyStore(account="other"))
    keyring.refuse = False
    with FeatureCache(tmp_path / "other", key_store=KeyringKeyStore(account="other")) as fresh:
        assert fresh.sessions() == []


def test_auto_picks_the_keyring_for_a_new_cache_and_keeps_an_existing_key_file(
    keyring: FakeKeyring, tmp_path: Path
) -> None:
    new = tmp_path / "new"
    assert isinstance(key_store_for(new, "auto"), KeyringKeyStore)
    assert isinstance(default_key_store(new), KeyringKeyStore)
    old = tmp_path / "old"
    with FeatureCache(old):  # created with the (default) key file
        pass
    store = key_store_for(old, "auto")
    assert isinstance(store, FileKeyStore) and store.path == old / KEY_FILE_NAME
    assert isinstance(key_store_for(old, "file"), FileKeyStore)
    assert isinstance(key_store_for(old, "keyring"), KeyringKeyStore)
    with pytest.raises(ValidationError):
        key_store_for(old, "plain")
    # keyring's "fail" (no OS keyring) and "null" (drops everything) backends are not usable.
    for backend in ("keyring.backends.fail", "keyring.backends.null"):
        keyring.backend = type("Keyring", (), {"__module__": backend})()
        assert isinstance(key_store_for(new, "auto"), FileKeyStore)


def test_open_cache_uses_the_configured_key_store(keyring: FakeKeyring, tmp_path: Path) -> None:
    from fedfer.agent.config import config_from_dict
    from fedfer.agent.store.device import open_cache

    assert config_from_dict({}).cache.key_store == "auto"
    for mode, in_keyring in (("auto", True), ("file", False), ("keyring", True)):
        state = tmp_path / mode
        keyring.entries.clear()
        config = config_from_dict({"agent": {"state_dir": str(state)}, "cache": {"key_store": mode}})
        cache = open_cache(config)
        try:
            sid = cache.begin_session()
            cache.append_batch(sid, make_records(1))
        finally:
            cache.close()
        assert bool(keyring.entries) is in_keyring, mode
        assert (state / "cache" / KEY_FILE_NAME).exists() is not in_keyring, mode
    # Without a usable keyring, "auto" is the 0600 key file.
    keyring.backend = type("Keyring", (), {"__module__": "keyring.backends.fail"})()
    keyring.entries.clear()
    config = config_from_dict({"agent": {"state_dir": str(tmp_path / "nokeyring")}})
    open_cache(config).close()
    assert keyring.entries == {} and (tmp_path / "nokeyring" / "cache" / KEY_FILE_NAME).exists()
