"""The deploy files say what the code does: readiness follows the leader's health status, the flags exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from fedfer.aggregator.cli import build_parser
from fedfer.aggregator.server import FEDERATION_SERVICE

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _k8s(kind: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "aggregator.yaml").read_text()) if d]
    return [d for d in docs if d["kind"] == kind]


def test_readiness_asks_for_the_federation_service_on_the_health_port_the_server_binds() -> None:
    (deployment,) = [d for d in _k8s("Deployment") if d["metadata"]["name"] == "fedfer-aggregator"]
    assert deployment["spec"]["replicas"] >= 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])  # every flag in the manifest exists
    assert args.command == "serve" and args.lease_ttl_s > 0
    host, _, port = args.health_listen.rpartition(":")
    health_port = int(port)
    assert host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == health_port
    # Only the leader is ready (the Service then routes to it alone); standbys stay alive.
    assert container["readinessProbe"]["grpc"] == {"port": health_port, "service": FEDERATION_SERVICE}
    assert container["livenessProbe"]["grpc"] == {"port": health_port}
    (service,) = _k8s("Service")
    assert health_port not in {p.get("targetPort") for p in service["spec"]["ports"]}
    assert "health" not in {p.get("targetPort") for p in service["spec"]["ports"]}
    # A disruption budget would count ready pods, of which there is one: it is left out on purpose.
    assert _k8s("PodDisruptionBudget") == []


def test_the_image_serves_health_on_the_exposed_port() -> None:
    text = (DEPLOY / "aggregator" / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    args = build_parser().parse_args(cmd)
    exposed = re.search(r"^EXPOSE (.*)$", text, re.MULTILINE).group(1).split()  # type: ignore[union-attr]
    assert args.health_listen.rpartition(":")[2] in exposed
