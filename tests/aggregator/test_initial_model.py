"""Federation starts from a trained central v: ``fedfer-aggregator init --classes/--initial-model``, the
origin of every model version, ``status`` listing them, ``import-model``'s checks, what ``serve`` says."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedfer.aggregator import shipped
from fedfer.aggregator.cli import main
from fedfer.aggregator.config import init_deployment
from fedfer.aggregator.registry import ModelRegistry, ModelVersion
from fedfer.aggregator.rounds import NO_MODEL_MESSAGE
from fedfer.aggregator.shipped import (
    SHIPPED_V,
    InitialModel,
    initial_central_v,
    random_central_v,
    shipped_central_v,
)
from fedfer.aggregator.storage import open_storage
from fedfer.security.errors import ValidationError
from tests.integration.federation_harness import Aggregator, Deployment, run_cli

SHIPPED_6 = f"shipped:vfer-6@{SHIPPED_V[6].weights_sha256[:12]}"


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run one ``fedfer-aggregator`` command in this process: exit status, stdout, stderr."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def status(capsys: pytest.CaptureFixture[str], directory: Path) -> dict[str, object]:
    code, out, err = cli(capsys, "status", directory)
    assert code == 0, err
    doc: dict[str, object] = json.loads(out)
    return doc


def published(out: str) -> dict[str, object]:
    """The JSON of init's ``model published: {...}`` line."""
    lines = [line for line in out.splitlines() if line.startswith("model published: ")]
    assert len(lines) == 1, out
    doc: dict[str, object] = json.loads(lines[0].removeprefix("model published: "))
    return doc


def model_version(directory: Path, version: int) -> ModelVersion:
    with open_storage(f"sqlite://{directory / 'aggregator.db'}") as storage:
        return ModelRegistry(storage).get(version)


@pytest.mark.parametrize("k", [4, 6, 7])
def test_init_publishes_the_shipped_trained_v_as_version_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], k: int
) -> None:
    code, out, err = cli(capsys, "init", tmp_path / "dep", "--classes", str(k))
    assert code == 0, err
    v1 = model_version(tmp_path / "dep", 1)
    arrays, meta = shipped_central_v(k)
    assert set(v1.arrays) == set(arrays)
    for name, array in arrays.items():  # bit for bit what the pinned files hold
        assert v1.arrays[name].dtype == np.float32 and v1.arrays[name].tobytes() == array.tobytes(), name
    origin = f"shipped:vfer-{k}@{SHIPPED_V[k].weights_sha256[:12]}"
    assert (v1.origin, v1.parent, v1.num_parameters) == (origin, None, meta["parameters"])
    assert published(out) == {
        "version": 1,
        "origin": origin,
        "sha256": v1.digest,
        "parameters": v1.num_parameters,
    }
    doc = status(capsys, tmp_path / "dep")
    assert doc["model_versions"] == [1]
    assert doc["models"] == [
        {
            "version": 1,
            "origin": origin,
            "sha256": v1.digest,
            "parameters": meta["parameters"],
            "parent": None,
        }
    ]
    assert doc["started_from"] == origin


def test_the_console_script_defaults_to_the_shipped_six_class_v(tmp_path: Path) -> None:
    out = run_cli("fedfer-aggregator", "init", str(tmp_path / "dep"))
    assert "deployment created" in out and published(out)["origin"] == SHIPPED_6
    doc = json.loads(run_cli("fedfer-aggregator", "status", str(tmp_path / "dep")))
    assert doc["started_from"] == SHIPPED_6
    assert [(m["version"], m["origin"], m["parameters"]) for m in doc["models"]] == [(1, SHIPPED_6, 205_894)]
    assert doc["rounds"] == [] and doc["devices"] == [] and doc["model_versions"] == [1]


def test_initial_model_none_publishes_nothing_and_status_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "init", tmp_path / "dep", "--initial-model", "none")
    assert code == 0, err
    assert "no model published" in out and "import-model" in out and "model published:" not in out
    doc = status(capsys, tmp_path / "dep")
    assert (doc["model_versions"], doc["models"], doc["started_from"]) == ([], [], None)


def _torch_default_bound(name: str) -> float:
    """PyTorch's default uniform init half-width for the video model's arrays (its layer sizes)."""
    fan = {"frame.0": 1280, "frame.2": 128, "lstm": 64, "out": 64}[name.rpartition(".")[0]]
    return 1.0 / math.sqrt(fan)


def test_a_random_initial_model_is_a_fixed_seed_default_init_flagged_random(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from fedfer.agent.models.video import VideoModel, from_named_arrays

    code, out, err = cli(capsys, "init", tmp_path / "dep", "--initial-model", "random", "--classes", "7")
    assert code == 0, err
    assert published(out)["origin"] == "random:seed=0"
    v1 = model_version(tmp_path / "dep", 1)
    expected = random_central_v(7, seed=0)
    assert all(v1.arrays[n].tobytes() == a.tobytes() for n, a in expected.items())
    doc = status(capsys, tmp_path / "dep")
    assert doc["started_from"] == "random:seed=0"
    assert [m["origin"] for m in doc["models"]] == ["random:seed=0"]  # type: ignore[union-attr]
    # Same seed, same arrays; another seed, other arrays; the layout of the agents' VideoModel.
    assert all(np.array_equal(random_central_v(7, seed=0)[n], a) for n, a in expected.items())
    other = random_central_v(7, seed=1)
    assert all(not np.array_equal(other[n], a) for n, a in expected.items())
    net = VideoModel(num_classes=7)
    from_named_arrays(net, expected)
    torch_init = {name: p.detach().numpy() for name, p in VideoModel(num_classes=7).named_parameters()}
    assert set(torch_init) == set(expected)
    for name, array in expected.items():
        bound = _torch_default_bound(name)
        assert np.abs(torch_init[name]).max() <= bound and np.abs(array).max() <= bound, name
        if array.size >= 256:  # the same uniform distribution as torch's: fills the interval, centred
            assert np.abs(array).max() > 0.95 * bound and abs(float(array.mean())) < 0.1 * bound, name
    assert torch.is_tensor(next(net.parameters()))

    code, out, err = cli(capsys, "init", tmp_path / "seeded", "--initial-model", "random", "--seed", "5")
    assert code == 0 and published(out)["origin"] == "random:seed=5"


def test_seed_applies_to_random_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "init", tmp_path / "dep", "--seed", "1")
    assert code == 2 and "--seed applies only to --initial-model random" in err
    assert not (tmp_path / "dep").exists()
    with pytest.raises(SystemExit):
        main(["init", str(tmp_path / "dep"), "--classes", "5"])  # argparse: not a shipped class set
    with pytest.raises(SystemExit):
        main(["init", str(tmp_path / "dep"), "--initial-model", "trained"])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda root: _flip_byte(root / "vfer-6" / "vfer.npz"), "vfer-6/vfer.npz"),
        (lambda root: (root / "vfer-6" / "vfer.npz").write_bytes(b"PK\x03\x04"), "vfer-6/vfer.npz"),
        (lambda root: (root / "vfer-6" / "vfer.json").write_text("{"), "vfer-6/vfer.json"),
        (lambda root: (root / "vfer-6" / "vfer.npz").unlink(), "vfer-6/vfer.npz"),
    ],
    ids=["flipped byte", "truncated", "manifest changed", "missing"],
)
@pytest.mark.parametrize("choice", ["shipped", "random"])
def test_a_changed_shipped_file_makes_init_fail_and_creates_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    damage: object,
    named: str,
    choice: str,
) -> None:
    root = tmp_path / "release"
    shutil.copytree(shipped.RELEASE_DIR, root)  # the repository's files are never touched
    damage(root)  # type: ignore[operator]
    monkeypatch.setattr(shipped, "RELEASE_DIR", root)
    code, out, err = cli(capsys, "init", tmp_path / "dep", "--initial-model", choice)
    assert code == 2 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "dep").exists() and "deployment created" not in out
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "init", tmp_path / "empty", "--initial-model", choice)
    assert code == 2 and named in err and list((tmp_path / "empty").iterdir()) == []
    # Another class set's files are intact: that init works.
    code, out, err = cli(capsys, "init", tmp_path / "four", "--classes", "4", "--initial-model", choice)
    assert code == 0, err


def test_a_deployment_whose_first_model_cannot_be_stored_is_no_deployment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dep = tmp_path / "dep"
    with pytest.raises(ValidationError, match="NaN"):
        init_deployment(
            dep, initial_model=InitialModel({"w": np.array([np.nan], np.float32)}, "random:seed=0")
        )
    assert not (dep / "aggregator.toml").exists()  # the configuration is written last
    code, _, err = cli(capsys, "status", dep)
    assert code == 2 and "aggregator.toml" in err
    init_deployment(dep, initial_model=initial_central_v("shipped", num_classes=6))  # init again: it works
    assert status(capsys, dep)["started_from"] == SHIPPED_6


def _savez(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_import_model_records_its_origin_and_refuses_what_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dep = tmp_path / "dep"
    assert cli(capsys, "init", dep)[0] == 0
    six, _ = shipped_central_v(6)
    seven, _ = shipped_central_v(7)
    bad = {
        "empty": (_savez(tmp_path / "empty.npz"), "holds no arrays"),
        "ints": (
            _savez(tmp_path / "ints.npz", **{n: a.astype(np.int32) for n, a in six.items()}),
            "not floating",
        ),
        "text": (tmp_path / "notes.npz", "cannot read notes.npz"),
        "7 classes": (
            _savez(tmp_path / "seven.npz", **seven),
            "'out.bias' has shape (7,), model version 1 has (6,)",
        ),
        "missing": (
            _savez(tmp_path / "part.npz", **{n: a for n, a in six.items() if n != "out.bias"}),
            "missing",
        ),
        "absent": (tmp_path / "nowhere.npz", "cannot read the model file nowhere.npz"),
    }
    (tmp_path / "notes.npz").write_text("not a zip")
    for what, (path, message) in bad.items():
        code, _, err = cli(capsys, "import-model", dep, path)
        assert code == 2 and message in err, (what, err)
    assert status(capsys, dep)["model_versions"] == [1]  # nothing was published

    tuned = {n: (a * 0.5).astype(np.float16) for n, a in six.items()}  # float16 files are read as float32
    path = _savez(tmp_path / "tuned v (1).npz", **tuned)
    code, out, err = cli(capsys, "import-model", dep, path)
    assert code == 0, err
    origin = f"import:tuned_v__1_.npz@{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    v2 = model_version(dep, 2)
    assert json.loads(out) == {"version": 2, "origin": origin, "sha256": v2.digest, "parameters": 205_894}
    assert all(np.array_equal(v2.arrays[n], a.astype(np.float32)) for n, a in tuned.items())
    doc = status(capsys, dep)
    assert [(m["version"], m["origin"], m["parent"]) for m in doc["models"]] == [  # type: ignore[union-attr]
        (1, SHIPPED_6, None),
        (2, origin, 1),
    ]
    assert doc["started_from"] == origin  # an import starts a new lineage; rounds would continue it


def test_import_model_into_an_empty_deployment_takes_any_float_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dep = tmp_path / "dep"
    assert cli(capsys, "init", dep, "--initial-model", "none")[0] == 0
    path = _savez(tmp_path / "v0.npz", w=np.linspace(-1, 1, 10, dtype=np.float64))
    code, out, err = cli(capsys, "import-model", dep, path)
    assert code == 0, err
    assert json.loads(out)["origin"].startswith("import:v0.npz@")
    assert status(capsys, dep)["started_from"] == json.loads(out)["origin"]


def test_create_storage_publishes_the_initial_model_into_the_new_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], storage_url: str
) -> None:
    dep = tmp_path / "dep"
    assert cli(capsys, "init", dep, "--classes", "4")[0] == 0
    config = dep / "aggregator.toml"
    default = f'url = "sqlite://{dep.resolve() / "aggregator.db"}"'
    assert default in config.read_text()
    config.write_text(config.read_text().replace(default, f'url = "{storage_url}"'))
    code, out, err = cli(capsys, "create-storage", dep, "--classes", "4")
    assert code == 0, err
    origin = f"shipped:vfer-4@{SHIPPED_V[4].weights_sha256[:12]}"
    assert "storage ready" in out and published(out)["origin"] == origin
    assert status(capsys, dep)["started_from"] == origin
    code, out, err = cli(capsys, "create-storage", dep, "--initial-model", "random")
    assert code == 0 and "already holds model versions 1-1: nothing published" in out, err
    assert [m["origin"] for m in status(capsys, dep)["models"]] == [origin]  # type: ignore[union-attr]


def _wait_for(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextlib.contextmanager
def serving(root: Path, initial: str) -> Iterator[tuple[Deployment, Aggregator]]:
    """``fedfer-aggregator serve`` (a real process) on a new deployment made with ``--initial-model``."""
    dep = Deployment(root / "agg", min_clients=2, max_clients=2, deadline_s=10, initial=initial)
    agg = dep.serve()
    try:
        yield dep, agg
    finally:
        agg.kill()


def test_serve_warns_when_federation_starts_from_a_random_v(tmp_path: Path) -> None:
    with serving(tmp_path, "random") as (_, agg):  # said before the ports are ready
        log = agg.log()
        assert "WARNING" in log and "descends from a RANDOM initial model (version 1, random:seed=0)" in log


def test_serve_names_the_trained_v_it_starts_from(tmp_path: Path) -> None:
    with serving(tmp_path, "shipped") as (_, agg):
        _wait_for(lambda: "open for check-in on model version 1" in agg.log(), "the first round")
        log = agg.log()
        assert f"lineage starts at version 1 ({SHIPPED_6})" in log and "RANDOM" not in log


def test_serve_starts_no_round_without_a_model_and_says_why(tmp_path: Path) -> None:
    with serving(tmp_path, "none") as (dep, agg):
        _wait_for(lambda: NO_MODEL_MESSAGE in agg.log(), "the no-model message")
        assert "open for check-in" not in agg.log() and agg.log().count(NO_MODEL_MESSAGE) == 1
        arrays, _ = shipped_central_v(6)
        run_cli("fedfer-aggregator", "import-model", str(dep.dir), str(_savez(tmp_path / "v.npz", **arrays)))
        _wait_for(lambda: "open for check-in on model version 1" in agg.log(), "a round once a model exists")
