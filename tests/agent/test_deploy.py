"""Deployment files, checked statically (no docker engine or macOS here) and with systemd-analyze."""

from __future__ import annotations

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
    ["systemd/install.sh", "systemd/uninstall.sh", "launchd/install.sh", "launchd/uninstall.sh"],
)
def test_install_scripts_are_strict_posix_shell(script: str) -> None:
    path = DEPLOY / script
    text = path.read_text()
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
