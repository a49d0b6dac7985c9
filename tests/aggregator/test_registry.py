"""The model registry over both storage backends: publish, fetch, lineage and tamper detection."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable, Iterator

import numpy as np
import psycopg
import pytest

from fedfer.aggregator.registry import ModelRegistry, ModelSummary, check_origin, lineage_start
from fedfer.aggregator.storage import ConflictError, NotFoundError, Storage, open_storage
from fedfer.security.errors import IntegrityError, ValidationError

ORIGIN = "import:test.npz@0123456789ab"
NOW = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC)


def model(value: float) -> dict[str, np.ndarray]:
    return {
        "fc1.weight": np.full((128, 1280), value, dtype=np.float32),
        "fc1.bias": np.arange(128, dtype=np.float32) * value,
        "out.bias": np.array([value, -value, 0.0, 1.0, 2.0, 3.0], dtype=np.float32),
    }


@pytest.fixture
def store(storage_url: str) -> Iterator[Storage]:
    with open_storage(storage_url, now=NOW, create=True) as storage:
        yield storage


@pytest.fixture
def registry(store: Storage) -> ModelRegistry:
    return ModelRegistry(store, clock=lambda: NOW)


def test_publish_get_latest(registry: ModelRegistry) -> None:
    assert registry.latest() is None and registry.versions() == []
    v1 = registry.publish(1, model(0.5), parent=None, origin=ORIGIN)
    v2 = registry.publish(2, model(0.25), parent=1, origin=ORIGIN)
    assert (v1.version, v1.parent, v2.parent) == (1, None, 1)
    assert v1.num_parameters == 128 * 1280 + 128 + 6
    assert v1.digest != v2.digest and len(v1.digest) == 64
    latest = registry.latest()
    assert latest is not None and latest.version == 2 and latest.digest == v2.digest
    got = registry.get(1)
    assert got.created_at == NOW and got.manifest == v1.manifest and got.blob == v1.blob
    for name, value in model(0.5).items():
        np.testing.assert_array_equal(got.arrays[name], value)
    assert registry.versions() == [1, 2]
    assert "blob" not in repr(got) and "arrays" not in repr(got)


def test_publish_rules(registry: ModelRegistry) -> None:
    registry.publish(1, model(1.0), parent=None, origin=ORIGIN)
    assert (
        registry.publish(1, model(1.0), parent=None, origin=ORIGIN).version == 1
    )  # identical retry is harmless
    with pytest.raises(ConflictError):
        registry.publish(1, model(2.0), parent=None, origin=ORIGIN)
    registry.publish(2, model(2.0), parent=1, origin=ORIGIN)
    with pytest.raises(ConflictError, match="parent"):
        registry.publish(2, model(2.0), parent=None, origin=ORIGIN)
    with pytest.raises(NotFoundError):
        registry.publish(5, model(2.0), parent=4, origin=ORIGIN)
    for version, parent in ((0, None), (3, 3), (3, 7), (True, None)):
        with pytest.raises(ValidationError):
            registry.publish(version, model(2.0), parent=parent, origin=ORIGIN)
    with pytest.raises(ValidationError):
        registry.publish(3, {"w": np.array([np.nan], dtype=np.float32)}, parent=1, origin=ORIGIN)
    with pytest.raises(NotFoundError):
        registry.get(99)


def test_each_version_keeps_its_origin_and_the_lineage_starts_where_rounds_began(
    registry: ModelRegistry,
) -> None:
    registry.publish(1, model(1.0), parent=None, origin="random:seed=0")
    registry.publish(2, model(1.5), parent=1, origin="round:4")
    registry.publish(3, model(2.0), parent=2, origin="import:trained.npz@0123456789ab")
    registry.publish(4, model(2.5), parent=3, origin="round:7")
    registry.publish(5, model(3.0), parent=4, origin="round:9")
    assert [registry.get(v).origin for v in (1, 2, 3)] == [
        "random:seed=0",
        "round:4",
        "import:trained.npz@0123456789ab",
    ]
    summaries = registry.summaries()
    assert [(s.version, s.parent, s.origin_kind) for s in summaries] == [
        (1, None, "random"), (2, 1, "round"), (3, 2, "import"), (4, 3, "round"), (5, 4, "round"),
    ]  # fmt: skip
    assert all(s.parameters == registry.get(s.version).num_parameters for s in summaries)
    assert [s.digest for s in summaries] == [registry.get(v).digest for v in range(1, 6)]
    # Rounds add the devices' mean update to their parent; an import starts a new lineage.
    assert lineage_start(summaries, 5).version == 3
    assert lineage_start(summaries, 2).origin == "random:seed=0"
    assert lineage_start(summaries, 1).version == 1
    with pytest.raises(NotFoundError):
        lineage_start(summaries, 6)
    with pytest.raises(NotFoundError):  # a parent that is not there
        lineage_start([s for s in summaries if s.version != 3], 5)
    assert registry.latest() is not None and registry.latest().origin == "round:9"  # type: ignore[union-attr]


def test_an_origin_is_required_and_checked(registry: ModelRegistry) -> None:
    for bad in (
        "",
        "unrecorded",
        "trained",
        "shipped:",
        "round:1 2",
        "import:a\nb",
        "import:" + "x" * 241,
        7,
        None,
    ):
        with pytest.raises(ValidationError, match="origin"):
            registry.publish(1, model(1.0), parent=None, origin=bad)  # type: ignore[arg-type]
    assert registry.versions() == []  # nothing was stored
    assert check_origin("shipped:vfer-6@f6751dd9e339") == "shipped:vfer-6@f6751dd9e339"
    registry.publish(1, model(1.0), parent=None, origin="shipped:vfer-6@f6751dd9e339")
    # The same content again under another origin is not the same version.
    with pytest.raises(ConflictError, match="origin"):
        registry.publish(1, model(1.0), parent=None, origin="random:seed=0")
    assert registry.get(1).origin == "shipped:vfer-6@f6751dd9e339"
    assert isinstance(registry.summaries()[0], ModelSummary)


def _rewrite(storage_url: str, column: str, version: int, change: Callable[[bytes], bytes]) -> None:
    """Change one stored column of one model version directly in the database, behind the registry's back."""
    select = f"SELECT {column} FROM models WHERE version = {version}"
    update = f"UPDATE models SET {column} = ? WHERE version = {version}"
    if storage_url.startswith("sqlite:"):
        conn = sqlite3.connect(storage_url.removeprefix("sqlite://"))
        try:
            old = conn.execute(select).fetchone()[0]
            new = change(old if isinstance(old, bytes) else old.encode())
            conn.execute(update, (new if isinstance(old, bytes) else new.decode(),))
            conn.commit()
        finally:
            conn.close()
    else:
        with psycopg.connect(storage_url, autocommit=True) as pg:
            row = pg.execute(select.encode()).fetchone()
            assert row is not None
            old = row[0]
            new = change(old if isinstance(old, bytes) else old.encode())
            pg.execute(update.replace("?", "%s").encode(), (new if isinstance(old, bytes) else new.decode(),))


def test_tampered_blob_is_detected_on_read(storage_url: str, registry: ModelRegistry) -> None:
    registry.publish(1, model(1.0), parent=None, origin=ORIGIN)
    registry.publish(2, model(2.0), parent=1, origin=ORIGIN)
    _rewrite(storage_url, "blob", 2, lambda b: b[:9] + bytes([b[9] ^ 0x01]) + b[10:])
    with pytest.raises(IntegrityError):
        registry.get(2)
    with pytest.raises(IntegrityError):
        registry.latest()
    assert registry.get(1).version == 1  # the untouched version is still served
    _rewrite(storage_url, "manifest", 1, lambda m: m.replace(b"out.bias", b"out.biaz"))
    with pytest.raises(IntegrityError):
        registry.get(1)


def test_registry_checks_arguments(store: Storage) -> None:
    with pytest.raises(ValidationError):
        ModelRegistry("db")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ModelRegistry(store, max_bytes=0)
    small = ModelRegistry(store, max_bytes=1024)
    with pytest.raises(ValidationError, match="larger"):
        small.publish(1, model(1.0), parent=None, origin=ORIGIN)
