"""Where the feature cache's key-encryption key (KEK) lives: a 0600 file, or the OS keyring when present.

:func:`key_store_for` picks the store for a cache directory: ``"file"``, ``"keyring"``, or ``"auto"`` (the
OS keyring when the optional ``keyring`` package has a working backend and the cache has no key file yet,
otherwise the key file), so a cache keeps the store it was created with.

A store holds one to two KEKs: normally one; two only for the short window of a rotation (old and new), so
that a crash at any point leaves the store holding the key the database was last committed under. The cache
picks the key whose fingerprint the database names.

The file format is ``b"FEDFERKEK1" || count(1) || count * 32 key bytes``. The file is written with mode 0600
atomically (:func:`fedfer.security.files.write_atomic`: a fresh ``O_EXCL`` temporary file, fsynced, renamed,
the directory fsynced), and a key file that group or others may read or write, that is not a regular file, or
that another user owns is refused.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Final, Protocol

from fedfer.security.envelope import KEY_BYTES, KeyEncryptionKey
from fedfer.security.errors import FedferError, ValidationError
from fedfer.security.files import fsync_dir, write_atomic

__all__ = [
    "KEY_FILE",
    "FileKeyStore",
    "InsecureKeyFileError",
    "KeyStore",
    "KeyStoreError",
    "KeyringKeyStore",
    "default_key_store",
    "key_store_for",
]

_MAGIC: Final = b"FEDFERKEK1"
KEY_FILE: Final = "cache.kek"  # the key file's name inside the cache directory
_MAX_KEYS: Final = 2
_READ_ATTEMPTS: Final = 5


class KeyStoreError(FedferError):
    """The KEK store is missing, malformed or unavailable."""


class InsecureKeyFileError(KeyStoreError, PermissionError):
    """The key file is readable or writable by group/others, not a regular file, or owned by someone else."""


class KeyStore(Protocol):
    """Persistence of a cache's KEKs (at most two, newest last)."""

    def load(self) -> list[KeyEncryptionKey]:
        """Return the stored keys, newest last; an empty list when none has been stored yet."""
        ...

    def save(self, keys: list[KeyEncryptionKey]) -> None:
        """Atomically replace the stored keys with ``keys`` (1 or 2, newest last)."""
        ...

    def destroy(self) -> None:
        """Remove every stored key (best-effort overwrite first)."""
        ...


def _check_count(keys: list[KeyEncryptionKey]) -> None:
    if not 1 <= len(keys) <= _MAX_KEYS or not all(isinstance(k, KeyEncryptionKey) for k in keys):
        raise ValidationError(f"a key store holds 1..{_MAX_KEYS} KeyEncryptionKey handles")


class FileKeyStore:
    """KEKs in a single file with mode 0600 (see the module docstring for the format and checks)."""

    def __init__(self, path: Path | str) -> None:
        """Use the key file at ``path`` (created on the first :meth:`save`)."""
        self._path = Path(path)

    def __repr__(self) -> str:
        return f"FileKeyStore({str(self._path)!r})"

    @property
    def path(self) -> Path:
        """The key file's path."""
        return self._path

    def load(self) -> list[KeyEncryptionKey]:
        """Read the keys after checking the file's type, owner and permissions.

        Raises:
            InsecureKeyFileError: the file is group/other accessible, not regular, or not ours.
            KeyStoreError: the file is malformed.
        """
        for attempt in range(_READ_ATTEMPTS):
            data = self._read_checked()
            if data is None:
                return []
            count = data[len(_MAGIC)] if len(data) > len(_MAGIC) else 0
            if (
                data.startswith(_MAGIC)
                and 1 <= count <= _MAX_KEYS
                and len(data) == len(_MAGIC) + 1 + count * KEY_BYTES
            ):
                body = data[len(_MAGIC) + 1 :]
                return [
                    KeyEncryptionKey.dangerously_import_plaintext(body[i * KEY_BYTES : (i + 1) * KEY_BYTES])
                    for i in range(count)
                ]
            # A concurrent save() may be wiping the file this read opened just before it was replaced:
            # opening the path again finds the new file.
            time.sleep(0.005 * (attempt + 1))
        raise KeyStoreError(f"key file {self._path} is malformed")

    def _read_checked(self) -> bytes | None:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP: a symlink where the key file should be
            raise InsecureKeyFileError(f"key file {self._path} cannot be opened safely") from exc
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise InsecureKeyFileError(f"key file {self._path} is not a regular file")
            if info.st_uid != os.getuid():
                raise InsecureKeyFileError(f"key file {self._path} is owned by another user")
            if info.st_mode & 0o077:
                raise InsecureKeyFileError(
                    f"key file {self._path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}); it must be 0600"
                )
            return fh.read(len(_MAGIC) + 1 + _MAX_KEYS * KEY_BYTES + 1)

    def save(self, keys: list[KeyEncryptionKey]) -> None:
        """Atomically replace the key file (0600, :func:`fedfer.security.files.write_atomic`).

        Then the replaced file's inode is wiped (best effort; see :meth:`destroy`). A failed write keeps the
        old file as it was.
        """
        _check_count(keys)
        payload = _MAGIC + bytes([len(keys)]) + b"".join(k.dangerously_export_plaintext() for k in keys)
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        old = self._open_existing()
        try:
            write_atomic(self._path, payload, mode=0o600)
        except BaseException:
            if old is not None:
                os.close(old)
            raise
        if old is not None:
            _wipe(old)

    def destroy(self) -> None:
        """Overwrite the key file with zeros, fsync, and unlink it.

        On copy-on-write or journaling file systems and SSDs the overwrite is best effort; the guarantee
        the cache relies on is that the wrapped data keys are gone from the database too.
        """
        old = self._open_existing()
        if old is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
                fsync_dir(self._path.parent)
        finally:
            _wipe(old)

    def _open_existing(self) -> int | None:
        try:
            return os.open(self._path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None


def _wipe(fd: int) -> None:
    """Overwrite an open file with zeros, fsync and close it."""
    try:
        size = os.fstat(fd).st_size
        os.pwrite(fd, b"\0" * size, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _import_keyring() -> Any:
    try:
        return importlib.import_module("keyring")
    except ImportError as exc:
        raise KeyStoreError("the OS keyring is unavailable: the 'keyring' package is not installed") from exc


class KeyringKeyStore:
    """KEKs in the OS keyring (Secret Service, macOS Keychain, Windows Credential Locker) via ``keyring``.

    ``keyring`` is an optional dependency; constructing this store without it raises :class:`KeyStoreError`.
    A keyring error, or a keyring that does not give back what was saved, is a :class:`KeyStoreError`.
    """

    def __init__(self, *, service: str = "fedfer-feature-cache", account: str) -> None:
        """Address the entry ``(service, account)``; ``account`` names one cache (e.g. its directory).

        Raises:
            KeyStoreError: ``keyring`` is not installed.
            ValidationError: an empty service or account name.
        """
        if not service or not account:
            raise ValidationError("keyring service and account must be non-empty")
        self._keyring = _import_keyring()
        self._service = service
        self._account = account

    def __repr__(self) -> str:
        return f"KeyringKeyStore(service={self._service!r}, account={self._account!r})"

    def load(self) -> list[KeyEncryptionKey]:
        """Read the keys from the keyring entry (empty list when absent)."""
        value = self._get()
        if value is None:
            return []
        try:
            encoded = json.loads(value)
            keys = [KeyEncryptionKey.dangerously_import_plaintext(base64.b64decode(e)) for e in encoded]
        except (ValueError, TypeError, ValidationError):
            raise KeyStoreError("the keyring entry of the feature cache is malformed") from None
        if not 1 <= len(keys) <= _MAX_KEYS:
            raise KeyStoreError("the keyring entry of the feature cache is malformed")
        return keys

    def save(self, keys: list[KeyEncryptionKey]) -> None:
        """Replace the keyring entry with ``keys``, then read it back: a keyring that drops it is an error."""
        _check_count(keys)
        encoded = [base64.b64encode(k.dangerously_export_plaintext()).decode("ascii") for k in keys]
        value = json.dumps(encoded)
        try:
            self._keyring.set_password(self._service, self._account, value)
        except self._keyring.errors.KeyringError:
            raise KeyStoreError("the OS keyring refused to store the feature cache's key") from None
        if self._get() != value:
            raise KeyStoreError("the OS keyring did not keep the feature cache's key")

    def destroy(self) -> None:
        """Delete the keyring entry if it exists."""
        errors = self._keyring.errors
        try:
            self._keyring.delete_password(self._service, self._account)
        except errors.PasswordDeleteError:
            return  # no entry: nothing to destroy
        except errors.KeyringError:
            raise KeyStoreError("the OS keyring refused to delete the feature cache's key") from None

    def _get(self) -> str | None:
        try:
            value = self._keyring.get_password(self._service, self._account)
        except self._keyring.errors.KeyringError:
            raise KeyStoreError("the OS keyring cannot be read") from None
        return value if value is None else str(value)


def _keyring_usable() -> bool:
    try:
        keyring = _import_keyring()
    except KeyStoreError:
        return False
    backend_module = type(keyring.get_keyring()).__module__
    # keyring's "fail" backend means no OS keyring here; its "null" backend would silently drop the key.
    return backend_module.rpartition(".")[2] not in ("fail", "null")


def key_store_for(directory: Path | str, mode: str = "auto") -> KeyStore:
    """The KEK store of the cache in ``directory``.

    Args:
        directory: the cache directory (names the keyring entry; holds the key file).
        mode: ``"file"`` (``directory/cache.kek``), ``"keyring"`` (the OS keyring, which must be available),
            or ``"auto"``: the key file when it exists or no usable keyring is present, else the keyring.

    Raises:
        KeyStoreError: ``"keyring"`` without the ``keyring`` package.
        ValidationError: an unknown mode.
    """
    directory = Path(directory)
    key_file = FileKeyStore(directory / KEY_FILE)
    if mode == "file":
        return key_file
    if mode == "keyring" or (mode == "auto" and not key_file.path.exists() and _keyring_usable()):
        return KeyringKeyStore(account=str(directory.absolute()))
    if mode == "auto":
        return key_file
    raise ValidationError('key store mode must be "file", "keyring" or "auto"')


def default_key_store(directory: Path | str) -> KeyStore:
    """``key_store_for(directory, "auto")``: the OS keyring when usable for a new cache, else the key file."""
    return key_store_for(directory, "auto")
