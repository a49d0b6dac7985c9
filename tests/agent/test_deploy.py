"""Deployment files, checked statically (no docker engine or macOS here) and with systemd-analyze."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "fedfer-agent.service"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is required for the unit checks (apt-get install systemd)")
    return tool


@pytest.fixture()
def rendered_unit(tmp_path: Path) -> Path:
    """The unit as install.sh renders it, with the prefix pointing at this checkout's venv."""
    prefix = Path(sys.executable).parents[1].parent  # <prefix>/venv/bin/python -> <prefix>
    venv = Path(sys.executable).parents[1]
    text = UNIT.read_text().replace("/opt/fedfer/venv", str(venv)).replace("/opt/fedfer", str(prefix))
    out = tmp_path / UNIT.name
    out.write_text(text)
    return out


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_verifies(rendered_unit: Path) -> None:
    out = subprocess.run(
        [_systemd_analyze(), "verify", str(rendered_unit)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "fedfer-agent.service" not in out.stderr, out.stderr  # no warnings about our unit


def test_systemd_unit_security_score_at_most_2(rendered_unit: Path) -> None:
    out = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", "--no-pager", str(rendered_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match is not None, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.0, out.stdout


def test_systemd_unit_hardening_settings() -> None:
    s = _unit_settings()
    assert s["User"] == ["fedfer"] and s["NoNewPrivileges"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"] and s["ProtectHome"] == ["yes"] and s["PrivateTmp"] == ["yes"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert s["DevicePolicy"] == ["closed"] and any("video4linux" in d for d in s["DeviceAllow"])
    assert s["StateDirectory"] == ["fedfer-agent"] and s["StateDirectoryMode"] == ["0700"]
    assert "@system-service" in s["SystemCallFilter"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert float(s["TimeoutStopSec"][0]) > 10  # the agent's own drain bound is 10 s
    names = {v.split("=")[0] for v in s["Environment"]}
    assert names == {"FEDFER_STATE_DIR", "FEDFER_ASSETS", "FEDFER_CACHE_DIR"}  # paths only


def test_launchd_plist_is_a_user_agent_with_keepalive_and_logs() -> None:
    path = DEPLOY / "launchd" / "org.fedfer.agent.plist"
    with path.open("rb") as fh:
        plist = plistlib.load(fh)
    assert plist["Label"] == "org.fedfer.agent"
    assert plist["ProgramArguments"][0].endswith("/bin/fedfer-agent")
    assert plist["ProgramArguments"][1] == "run"
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] in (True, {"SuccessfulExit": False})
    assert plist["StandardErrorPath"].startswith("__HOME__/Library/Logs/")
    assert plist["StandardOutPath"].startswith("__HOME__/Library/Logs/")
    assert plist["Umask"] == 0o077
    assert set(plist["EnvironmentVariables"]) <= {"FEDFER_STATE_DIR", "FEDFER_ASSETS", "FEDFER_CONFIG"}
    # A LaunchAgent (per user, so camera permission works) is installed under ~/Library/LaunchAgents.
    assert "UserName" not in plist
    assert "LaunchAgents" in (DEPLOY / "launchd" / "install.sh").read_text()


@pytest.mark.parametrize(
    "script",
    [
        "systemd/install.sh",
        "systemd/uninstall.sh",
        "launchd/install.sh",
        "launchd/uninstall.sh",
        "install-lib.sh",
    ],
)
def test_install_scripts_are_strict_posix_shell(script: str) -> None:
    path = DEPLOY / script
    text = path.read_text()
    if script == "install-lib.sh":  # sourced by both installers (after their `set -eu`), not run
        assert '. "$SRC/deploy/install-lib.sh"' in (DEPLOY / "systemd" / "install.sh").read_text()
        assert '. "$SRC/deploy/install-lib.sh"' in (DEPLOY / "launchd" / "install.sh").read_text()
    else:
        assert text.startswith("#!/bin/sh\n") and "\nset -eu\n" in text
        assert path.stat().st_mode & 0o111
    assert subprocess.run(["sh", "-n", str(path)], capture_output=True, timeout=30).returncode == 0
    # Idempotence: creation steps are guarded or naturally repeatable.
    lines = [line.strip() for line in text.splitlines()]
    for index, line in enumerate(lines):
        if line.startswith(("useradd", "userdel")):
            assert "id fedfer" in lines[index - 1], f"unguarded {line.split()[0]} in {script}"
        assert not line.startswith("mkdir ") or "-p" in line, line
        assert not line.startswith("rm ") or "f" in line.split()[1], line
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:
        out = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout


def test_aggregator_dockerfile_is_base_only_and_non_root() -> None:
    text = (DEPLOY / "aggregator" / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[-1] == "USER"
    user = text.strip().splitlines()[-1].split()[1]
    assert user.split(":")[0] not in ("root", "0")
    assert "[agent" not in text and "torch" not in text and "mediapipe" not in text
    assert re.search(r"pip install[^\n]*fedfer-\*\.whl", text)
    assert "--no-deps" in text  # the wheel is built alone; its base dependencies come from the base install


def _k8s_docs() -> list[dict[str, object]]:
    docs: list[dict[str, object]] = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_kubernetes_manifests_use_postgres_and_run_as_non_root() -> None:
    docs = _k8s_docs()
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    names = {d["metadata"]["name"] for d in workloads}  # type: ignore[index]
    assert {"fedfer-aggregator", "fedfer-postgres"} <= names
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]  # type: ignore[index]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    postgres = next(d for d in workloads if d["metadata"]["name"] == "fedfer-postgres")  # type: ignore[index]
    assert postgres["spec"]["template"]["spec"]["containers"][0]["image"].startswith("postgres:")  # type: ignore[index]
    env = {e["name"]: e for e in postgres["spec"]["template"]["spec"]["containers"][0]["env"]}  # type: ignore[index]
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]  # no password in the manifests
    assert not any(d["kind"] == "Secret" for d in docs)
    aggregator = next(d for d in workloads if d["metadata"]["name"] == "fedfer-aggregator")  # type: ignore[index]
    container = aggregator["spec"]["template"]["spec"]["containers"][0]  # type: ignore[index]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "postgresql://" in (DEPLOY / "kubernetes" / "aggregator.yaml").read_text()


def test_compose_file_uses_postgres_and_secrets() -> None:
    compose = yaml.safe_load((DEPLOY / "aggregator" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    agg = services["aggregator"]
    assert agg["user"].split(":")[0] not in ("0", "root")
    assert agg["read_only"] is True and agg["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in agg["security_opt"]
    assert agg["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert agg["build"]["dockerfile"] == "deploy/aggregator/Dockerfile"
    assert "POSTGRES_PASSWORD" not in services["postgres"]["environment"]  # only the _FILE form
    assert set(compose["secrets"]) == {"postgres_password"}
    assert "./deployment:/etc/fedfer/aggregator:ro" in agg["volumes"]
    dockerfile = (DEPLOY / "aggregator" / "Dockerfile").read_text()
    assert '"--config", "/etc/fedfer/aggregator/aggregator.toml"' in dockerfile


@pytest.mark.parametrize("name", ["deploy-systemd.md", "deploy-launchd.md", "deploy-aggregator.md"])
def test_each_deployment_path_is_documented(name: str) -> None:
    text = (REPO / "docs" / name).read_text()
    assert text.startswith("# Deploying ")
    assert "```" in text and len(text.split()) > 100


# ------------------------------------------------------------------ install scripts, in a temporary prefix

VENV = Path(sys.executable).parents[1]


def _fake_tools(folder: Path, calls: Path, *, uid: int | None = None) -> Path:
    """Stand-ins for the system tools the installers call (they log their arguments); nothing real changes.

    ``plutil -lint`` is a real check of the rendered plist (plistlib); ``id -u`` answers ``uid`` when given.
    """
    folder.mkdir()
    for tool in ("systemctl", "useradd", "usermod", "userdel", "chgrp", "launchctl"):
        script = folder / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n')
        script.chmod(0o755)
    plutil = folder / "plutil"
    plutil.write_text(
        f'#!/bin/sh\necho "plutil $*" >> "{calls}"\n'
        f'exec "{sys.executable}" -c "import plistlib, sys; plistlib.load(open(sys.argv[1], \'rb\'))" "$2"\n'
    )
    plutil.chmod(0o755)
    if uid is not None:
        fake_id = folder / "id"
        fake_id.write_text(
            f'#!/bin/sh\nif [ "$1" = "-u" ]; then echo {uid}; else exec /usr/bin/id "$@"; fi\n'
        )
        fake_id.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def ifer_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real IFER export written by ``save_ifer`` (weights untrained: installation is under test here)."""
    from fedfer.agent.models.ifer import FaceNet, save_ifer
    from fedfer.agent.models.mobilenet import MobileNetV2, Normalization

    net = FaceNet(
        backbone=MobileNetV2(),
        normalization=Normalization("tf", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        num_classes=6,
        input_size=112,
        split=19,
    )
    return save_ifer(net, tmp_path_factory.mktemp("ifer") / "export")


def _with_ifer(assets: Path, export: Path) -> tuple[str, ...]:
    """An installer's arguments: models from ``assets``, the IFER ``export``, this checkout's venv."""
    return ("--assets", str(assets), "--ifer", str(export), "--venv", str(VENV))


def _systemd_env(tmp_path: Path, calls: Path) -> dict[str, str]:
    """The systemd installer's environment: fake system tools first on PATH, every path below ``tmp_path``."""
    return {
        **os.environ,
        "PATH": f"{_fake_tools(tmp_path / 'bin', calls)}:{os.environ['PATH']}",
        "PREFIX": str(tmp_path / "opt"),
        "CONF_DIR": str(tmp_path / "etc"),
        "UNIT_DIR": str(tmp_path / "units"),
    }


def _run(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(DEPLOY / script), *args], capture_output=True, text=True, env=env, timeout=300
    )


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_systemd_install_provisions_verified_models_and_an_ifer_export(
    tmp_path: Path, assets: Path, ifer_export: Path
) -> None:
    from fedfer.agent.config import apply_path_overrides, load_config
    from fedfer.agent.daemon.preflight import ifer_untrained, startup_warnings
    from fedfer.agent.models.provision import DETECTOR, IFER_DIR, MOBILENET_TFLITE

    calls = tmp_path / "calls.log"
    prefix, conf, units = tmp_path / "opt", tmp_path / "etc", tmp_path / "units"
    env = _systemd_env(tmp_path, calls)
    # Without an IFER decision the installer refuses (and installs nothing).
    out = _run("systemd/install.sh", "--assets", str(assets), "--venv", str(VENV), env=env)
    assert out.returncode == 2 and "--ifer EXPORT" in out.stderr and not prefix.exists()

    out = _run("systemd/install.sh", *_with_ifer(assets, ifer_export), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    installed = prefix / "assets"
    for model in (DETECTOR, MOBILENET_TFLITE):
        assert _digest(installed / model.relative) == model.sha256 == _digest(assets / model.relative)
    assert sorted(p.name for p in (installed / IFER_DIR).iterdir()) == ["ifer.json", "ifer.npz"]
    assert not list(installed.rglob("*.part"))

    # The unit runs this venv with this config and assets; systemctl was asked to enable and start it.
    unit = (units / "fedfer-agent.service").read_text()
    assert f"ExecStart={VENV}/bin/fedfer-agent run --config {conf}/agent.toml" in unit
    assert f"Environment=FEDFER_ASSETS={installed}" in unit and "/opt/fedfer" not in unit
    log = calls.read_text().splitlines()
    assert log[-3:] == [
        "systemctl daemon-reload",
        "systemctl enable fedfer-agent.service",
        "systemctl restart fedfer-agent.service",
    ]
    assert f"chgrp fedfer {conf}/agent.toml.tmp" in log
    assert (conf / "agent.toml").stat().st_mode & 0o777 == 0o640

    # The installed configuration names the export, and the service's vision stage loads for real: a real
    # frame becomes a record whose IFER probabilities come from the installed export.
    config = apply_path_overrides(
        load_config(conf / "agent.toml"),
        {"FEDFER_ASSETS": str(installed), "FEDFER_STATE_DIR": str(tmp_path / "state")},
    )
    assert config.vision.ifer_model == IFER_DIR and not ifer_untrained(config)
    assert startup_warnings(config) == []
    from fedfer.agent.capture.video import VideoSource
    from fedfer.agent.vision.pipeline import open_vision

    stage = open_vision(config)
    try:
        with VideoSource(
            source=next((assets / "data" / "crema-d-sample").glob("*.flv")), max_frames=3
        ) as src:
            records = [stage.process(f.image, f.timestamp) for f in src.frames()]
    finally:
        stage.close()
    assert any(r is not None and r.ifer_probs.shape == (6,) for r in records)

    # Running it again upgrades in place: what is installed is verified, the operator's config is kept.
    (conf / "agent.toml").write_text((conf / "agent.toml").read_text() + "\n# edited by the operator\n")
    out = _run("systemd/install.sh", "--venv", str(VENV), env=env)
    assert out.returncode == 0, out.stderr
    assert (conf / "agent.toml").read_text().endswith("# edited by the operator\n")

    # Uninstall removes the unit and the model files, keeps the configuration (no PURGE).
    out = _run("systemd/uninstall.sh", env=env)
    assert out.returncode == 0, out.stderr
    assert not (units / "fedfer-agent.service").exists() and not installed.exists()
    assert (
        conf / "agent.toml"
    ).exists() and "systemctl disable --now fedfer-agent.service" in calls.read_text()


@pytest.mark.slow
def test_install_refuses_a_model_file_that_fails_its_pinned_digest(tmp_path: Path, assets: Path) -> None:
    from fedfer.agent.models.provision import DETECTOR

    source = tmp_path / "assets"
    bad = source / DETECTOR.relative
    bad.parent.mkdir(parents=True)
    data = bytearray((assets / DETECTOR.relative).read_bytes())
    data[1000] ^= 0xFF  # one flipped byte
    bad.write_bytes(bytes(data))
    prefix = tmp_path / "opt"
    env = _systemd_env(tmp_path, tmp_path / "calls.log")
    out = _run("systemd/install.sh", "--assets", str(source), "--without-ifer", "--venv", str(VENV), env=env)
    assert out.returncode != 0
    assert "does not match the pinned digest" in out.stderr
    assert not (prefix / "assets" / DETECTOR.relative).exists()  # nothing under the final name
    assert not list(prefix.rglob("*.part"))
    assert not (tmp_path / "units" / "fedfer-agent.service").exists()  # the service was not installed
    assert "systemctl" not in (tmp_path / "calls.log").read_text()


@pytest.mark.slow
def test_launchd_install_renders_a_user_agent_with_provisioned_models(
    tmp_path: Path, assets: Path, ifer_export: Path
) -> None:
    from fedfer.agent.config import load_config
    from fedfer.agent.models.provision import DETECTOR, IFER_DIR

    calls = tmp_path / "calls.log"
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{_fake_tools(tmp_path / 'bin', calls, uid=501)}:{os.environ['PATH']}",
        "HOME": str(home),
    }
    env.pop("PREFIX", None)
    out = _run("launchd/install.sh", *_with_ifer(assets, ifer_export), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    support = home / "Library" / "Application Support" / "fedfer"
    installed = support / "app" / "assets"
    assert _digest(installed / DETECTOR.relative) == DETECTOR.sha256
    assert (installed / IFER_DIR / "ifer.json").is_file()
    plist_path = home / "Library" / "LaunchAgents" / "org.fedfer.agent.plist"
    with plist_path.open("rb") as fh:
        plist = plistlib.load(fh)
    assert plist["ProgramArguments"] == [
        f"{VENV}/bin/fedfer-agent",
        "run",
        "--config",
        f"{support}/agent.toml",
    ]
    assert plist["EnvironmentVariables"] == {
        "FEDFER_STATE_DIR": f"{support}/state",
        "FEDFER_ASSETS": str(installed),
    }
    assert load_config(support / "agent.toml").vision.ifer_model == IFER_DIR
    assert (support / "state").stat().st_mode & 0o777 == 0o700
    assert (support / "agent.toml").stat().st_mode & 0o777 == 0o600
    log = calls.read_text().splitlines()
    assert log[-2:] == [
        "launchctl bootout gui/501/org.fedfer.agent",
        f"launchctl bootstrap gui/501 {plist_path}",
    ]
    assert any(line.startswith("plutil -lint ") for line in log)
