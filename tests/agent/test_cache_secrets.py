"""No key material (KEK or DEK bytes) and no feature values in logs, reprs or exception messages."""

from __future__ import annotations

import base64
import logging
import sqlite3
import traceback
from pathlib import Path

import pytest

from fedfer.agent.store.cache import KEY_FILE_NAME, FeatureCache, SessionNotFoundError
from fedfer.agent.store.keys import FileKeyStore, InsecureKeyFileError
from fedfer.security.envelope import DataKey, KeyEncryptionKey
from fedfer.security.errors import FedferError
from tests.agent.test_cache import make_records


def renderings(secret: bytes) -> list[str]:
    """Ways a careless log line could spell ``secret``."""
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
        str(list(secret))[1:-1],
    ]


def test_no_secret_in_logs_reprs_or_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    directory = tmp_path / "cache"
    texts: list[str] = []
    errors: list[BaseException] = []
    records = make_records(6)

    cache = FeatureCache(directory)
    sid = cache.begin_session()
    cache.append_batch(sid, records)
    pre_seal_kek = FileKeyStore(directory / KEY_FILE_NAME).load()[0]
    cache.end_session(sid)  # rotates the KEK: the pre-seal one must not be logged either
    contents = cache.recover_session(sid)
    kek = FileKeyStore(directory / KEY_FILE_NAME).load()[0]
    conn = sqlite3.connect(cache.database_path)
    (cache_id,) = conn.execute("SELECT value FROM meta WHERE name = 'cache_id'").fetchone()
    (wrapped,) = conn.execute("SELECT wrapped_dek FROM sessions").fetchone()
    conn.execute("UPDATE records SET blob = substr(blob, 1, 40) WHERE seq = 1")
    conn.commit()
    # A sealed session's data key is bound to its id and "sealed".
    dek = kek.unwrap_data_key(bytes(wrapped), cache_id=bytes(cache_id), session_id=(sid + "/sealed").encode())
    secrets = [kek.dangerously_export_plaintext(), dek._material, pre_seal_kek.dangerously_export_plaintext()]

    shown = (cache, kek, dek, contents, *records, *cache.sessions(), cache.session_info(sid))
    texts += [repr(x) for x in shown]
    texts += [str(x) for x in (kek, dek, FileKeyStore(directory / KEY_FILE_NAME))]
    # Error paths: a corrupted record, an unknown session, a wrong KEK, a key file with loose permissions.
    for action in (
        lambda: cache.read_session(sid),
        lambda: cache.read_record(sid, 1),
        lambda: cache.forget("0" * 32),
    ):
        with pytest.raises(FedferError) as info:
            action()
        errors.append(info.value)
    cache.forget(sid)  # rotates the KEK: the old one must not be logged either
    secrets.append(FileKeyStore(directory / KEY_FILE_NAME).load()[0].dangerously_export_plaintext())
    cache.purge()
    secrets.append(FileKeyStore(directory / KEY_FILE_NAME).load()[0].dangerously_export_plaintext())
    cache.close()
    store = FileKeyStore(directory / KEY_FILE_NAME)
    good = store.load()
    store.save([KeyEncryptionKey.generate()])
    with pytest.raises(FedferError) as info:
        FeatureCache(directory)
    errors.append(info.value)
    store.save(good)
    (directory / KEY_FILE_NAME).chmod(0o644)
    with pytest.raises(InsecureKeyFileError) as info:
        FeatureCache(directory)
    errors.append(info.value)
    with pytest.raises(SessionNotFoundError) as info:
        FeatureCache(tmp_path / "other").read_session(sid)
    errors.append(info.value)
    for handle in (KeyEncryptionKey.generate(), DataKey.generate()):
        texts.append(repr(handle))

    for err in errors:
        texts.append("".join(traceback.format_exception(err)))
    texts.append(caplog.text)
    assert "forgotten" in caplog.text  # the log did record the events, just not their secrets
    haystack = "\n".join(texts)
    for secret in secrets:
        for spelling in renderings(secret):
            assert spelling not in haystack
    # Feature values never appear either (records render without their arrays).
    feature_text = str(records[0].feature[:4].tolist())[1:-1]
    assert feature_text not in haystack
