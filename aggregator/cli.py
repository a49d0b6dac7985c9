"""``fedfer-aggregator``: create a deployment, issue enrollment tokens, run the service, revoke devices.

Commands::

    fedfer-aggregator init DIR [--classes {4,6,7}] [--initial-model {shipped,random,none}] [--seed N]
                           [--listen HOST:PORT] [--min-clients N] ...   # publishes the shipped v as version 1
    fedfer-aggregator create-storage DIR [--classes ...] [--initial-model ...]  # after pointing [storage] url
    fedfer-aggregator token DIR [--label TEXT] [--ttl-hours H]       # prints one one-time token
    fedfer-aggregator import-model DIR FILE.npz                      # publishes FILE as the next central v
    fedfer-aggregator serve --config DIR/aggregator.toml [--enroll-listen HOST:PORT] [--rounds N] ...
    fedfer-aggregator revoke DIR DEVICE_ID
    fedfer-aggregator status DIR                 # JSON: devices, rounds, model versions with their origins

Files are read here (entry point) and nowhere deeper; secrets never reach stdout except the token that
``token`` exists to print.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.aggregator.config import (
    CONFIG_FILENAME,
    AggregatorConfig,
    RoundConfig,
    StageDeadlines,
    create_enrollment_token,
    init_deployment,
    load_config,
    read_certificate_authority,
    read_server_tls,
)
from fedfer.aggregator.enrollment import EnrollmentService
from fedfer.aggregator.leader import LeaderLease
from fedfer.aggregator.registry import ModelRegistry, ModelVersion, lineage_start
from fedfer.aggregator.rounds import RoundCoordinator, RoundSettings
from fedfer.aggregator.secret_files import write_public_file
from fedfer.aggregator.server import ServerTls, build_server, serve_forever
from fedfer.aggregator.service import EdgeLimits
from fedfer.aggregator.shipped import INITIAL_MODELS, SHIPPED_V, InitialModel, initial_central_v
from fedfer.aggregator.storage import open_storage, redact_url
from fedfer.security.errors import FedferError, ValidationError

__all__ = ["GRPC_CIPHER_ENV", "TLS13_ONLY_CIPHERS", "build_parser", "main", "round_settings"]

_log = logging.getLogger("aggregator")


def _config_path(target: str) -> Path:
    path = Path(target)
    return path / CONFIG_FILENAME if path.is_dir() else path


def round_settings(config: AggregatorConfig, args: argparse.Namespace) -> RoundSettings:
    """Combine the deployment's ``[rounds]`` section with the ``serve`` flags into :class:`RoundSettings`.

    The config's ``threshold_fraction`` is applied to each device's share holders (its neighbours and
    itself), which is what the SecAgg+ threshold constrains.
    """
    r = config.rounds
    if not r.secagg_plus:
        degree = 0
    elif r.neighbours is None:
        degree = -1
    else:
        degree = r.neighbours + (r.neighbours % 2)  # SecAgg+ needs an even degree
    d = r.deadlines
    return RoundSettings(
        min_clients=r.min_clients,
        max_clients=r.max_clients,
        threshold=r.threshold if r.threshold is not None else float(r.threshold_fraction),
        degree=degree,
        checkin_s=float(args.checkin_s),
        advertise_s=float(d.advertise_keys_s),
        share_s=float(d.share_keys_s),
        masked_s=float(d.masked_input_s),
        consistency_s=float(d.consistency_check_s),
        unmask_s=float(d.unmask_s),
        straggler_grace_s=float(r.straggler_grace_s),
        budget_s=float(r.budget_s),
        rounds=int(args.rounds),
        clip=float(args.clip),
        max_weight=int(args.max_weight),
    )


def _enroll_listen(listen: str, override: str | None) -> str:
    if override:
        return override
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + 1}" if int(port) else f"{host}:0"


async def _serve(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args.config))
    key_pem, cert_pem, ca_pem = read_server_tls(config)
    tls = ServerTls(certificate_pem=cert_pem, private_key_pem=key_pem, ca_certificate_pem=ca_pem)
    storage = open_storage(config.storage_url)
    try:
        registry = ModelRegistry(storage)
        enrollment = EnrollmentService(
            storage=storage,
            ca=read_certificate_authority(config),
            certificate_validity=config.certificate_validity,
        )
        settings = round_settings(config, args)
        latest = registry.latest()
        _log_lineage(registry, latest)
        dim = latest.num_parameters if latest is not None else int(args.max_dim)
        limits = EdgeLimits.for_dimension(
            dim=max(dim, int(args.max_dim)),
            max_message_bytes=config.max_message_bytes,
            max_clients=settings.max_clients,
        )
        lease = LeaderLease(storage, cohort=settings.cohort, ttl_s=float(args.lease_ttl_s))
        # The coordinator takes over an interrupted round only once it holds the lease; until then (a
        # standby) the federation service reports NOT_SERVING and refuses calls with UNAVAILABLE.
        coordinator = RoundCoordinator(storage=storage, registry=registry, settings=settings, lease=lease)
        running = await build_server(
            tls=tls,
            storage=storage,
            registry=registry,
            enrollment=enrollment,
            coordinator=coordinator,
            limits=limits,
            listen=config.listen,
            enroll_listen=_enroll_listen(config.listen, args.enroll_listen),
            health_listen=args.health_listen,
            advertise_port=args.advertise_port,
        )
        ports = {"port": running.port, "enroll_port": running.enroll_port, "health_port": running.health_port}
        if args.ports_file:
            write_public_file(args.ports_file, json.dumps(ports).encode())
        print(json.dumps({"ready": True, **ports}), flush=True)
        await serve_forever(running, coordinator, response_retention_s=float(args.response_retention_s))
    finally:
        storage.close()
    return 0


def _log_lineage(registry: ModelRegistry, latest: ModelVersion | None) -> None:
    """Say at start which v federation continues from; warn when its lineage starts from a random init."""
    if latest is None:
        return  # the coordinator says, clearly and once, that no round starts without a model
    start = lineage_start(registry.summaries(), latest.version)
    if start.origin_kind == "random":
        _log.warning(
            "model version %d descends from a RANDOM initial model (version %d, %s), not from a trained v: "
            "federation is learning from scratch (the shipped trained v is published by `fedfer-aggregator "
            "init` without --initial-model random, or import one with `import-model`)",
            latest.version,
            start.version,
            start.origin,
        )
    else:
        _log.info(
            "latest model version %d (%s); its lineage starts at version %d (%s)",
            latest.version,
            latest.origin,
            start.version,
            start.origin,
        )


def _initial_model(args: argparse.Namespace) -> InitialModel | None:
    """The initial central v the ``--initial-model``, ``--classes`` and ``--seed`` flags choose, verified."""
    if args.seed is not None and args.initial_model != "random":
        raise ValidationError("--seed applies only to --initial-model random")
    return initial_central_v(args.initial_model, num_classes=args.classes, seed=args.seed or 0)


def _model_summary(model: ModelVersion) -> dict[str, Any]:
    return {
        "version": model.version,
        "origin": model.origin,
        "sha256": model.digest,
        "parameters": model.num_parameters,
    }


def _report_initial(model: ModelVersion | None, directory: object) -> None:
    """Print what ``init`` or ``create-storage`` published as version 1, or that it published nothing."""
    if model is None:
        print(
            f"no model published (--initial-model none): run `fedfer-aggregator import-model {directory} "
            "FILE.npz` before the first round; until then `serve` starts no round"
        )
    else:
        print(f"model published: {json.dumps(_model_summary(model), sort_keys=True)}")


def _cmd_init(args: argparse.Namespace) -> int:
    # Read and verify the initial model before anything is created: a missing or changed shipped file
    # leaves no deployment behind.
    initial = _initial_model(args)
    deadlines = StageDeadlines(
        advertise_keys_s=args.deadline_s, share_keys_s=args.deadline_s,
        masked_input_s=args.deadline_s, consistency_check_s=args.deadline_s, unmask_s=args.deadline_s,
    )  # fmt: skip
    rounds = RoundConfig(
        min_clients=args.min_clients,
        max_clients=args.max_clients,
        threshold=args.threshold,
        secagg_plus=not args.complete_graph,
        neighbours=args.neighbours,
        deadlines=deadlines,
        straggler_grace_s=args.straggler_grace_s,
        budget_s=args.round_budget_s,
    )
    config = init_deployment(args.dir, listen=args.listen, rounds=rounds, initial_model=initial)
    print(f"deployment created: {config.source} (give devices {config.tls.ca_cert})")
    if initial is None:
        _report_initial(None, args.dir)
    else:
        with open_storage(config.storage_url) as storage:
            _report_initial(ModelRegistry(storage).get(1), args.dir)
    return 0


def _cmd_create_storage(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args.dir))
    initial = _initial_model(args)
    with open_storage(config.storage_url, create=True) as storage:
        version = storage.schema_version()
        print(f"storage ready: {redact_url(config.storage_url)} (schema version {version})")
        versions = storage.list_model_versions()
        if versions:
            print(
                f"the registry already holds model versions {versions[0]}-{versions[-1]}: nothing published"
            )
        elif initial is None:
            _report_initial(None, args.dir)
        else:
            model = ModelRegistry(storage).publish(1, initial.arrays, parent=None, origin=initial.origin)
            _report_initial(model, args.dir)
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args.dir))
    issued = create_enrollment_token(config, label=args.label, ttl=dt.timedelta(hours=args.ttl_hours))
    print(issued.token)
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args.dir))
    with open_storage(config.storage_url) as storage:
        enrollment = EnrollmentService(storage=storage, ca=read_certificate_authority(config))
        record = enrollment.revoke(args.device_id)
    print(f"revoked {record.device_id}")
    return 0


def _read_model_file(path: Path) -> tuple[dict[str, Any], str]:
    """The named float arrays of a ``.npz`` (as float32) and the file's SHA-256.

    Raises:
        ValidationError: unreadable, not a ``.npz`` of arrays, empty, or an array that is not floating point.
    """
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ValidationError(f"cannot read the model file {path.name}: {exc.strerror}") from None
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as data:
            raw = {name: data[name] for name in data.files}
    except (OSError, ValueError, AttributeError, EOFError) as exc:
        raise ValidationError(f"cannot read {path.name}: expected a .npz of named float arrays") from exc
    if not raw:
        raise ValidationError(f"{path.name} holds no arrays: a central v is a .npz of named float arrays")
    for name, array in sorted(raw.items()):
        if array.dtype.kind != "f":
            raise ValidationError(
                f"{path.name}: array {name!r} is {array.dtype} (not floating point); refused"
            )
    arrays = {name: array.astype(np.float32) for name, array in raw.items()}
    return arrays, hashlib.sha256(content).hexdigest()


def _check_layout(arrays: dict[str, Any], expected: ModelVersion, file_name: str) -> None:
    """Refuse arrays whose names or shapes differ from the deployment's current v (devices expect them)."""
    got = {name: tuple(a.shape) for name, a in arrays.items()}
    want = {name: tuple(a.shape) for name, a in expected.arrays.items()}
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ValidationError(
            f"{file_name} does not have the arrays of model version {expected.version} "
            f"(missing {missing[:5]}, unexpected {extra[:5]}); a deployment keeps one layout"
        )
    for name in sorted(want):
        if got[name] != want[name]:
            raise ValidationError(
                f"{file_name}: array {name!r} has shape {got[name]}, model version {expected.version} has "
                f"{want[name]} (a different class count?); a deployment keeps one layout"
            )


def _import_origin(path: Path, sha256: str) -> str:
    """``import:<file name>@<sha256 prefix>``, the file name reduced to the characters an origin allows."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", path.name)[:100] or "model"
    return f"import:{name}@{sha256[:12]}"


def _cmd_import_model(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args.dir))
    arrays, sha256 = _read_model_file(args.file)
    with open_storage(config.storage_url) as storage:
        registry = ModelRegistry(storage)
        current = registry.latest()
        if current is not None:
            _check_layout(arrays, current, args.file.name)
        latest = None if current is None else current.version
        model = registry.publish(
            (latest or 0) + 1, arrays, parent=latest, origin=_import_origin(args.file, sha256)
        )
    print(json.dumps(_model_summary(model), sort_keys=True))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args.dir))
    with open_storage(config.storage_url) as storage:
        rounds = storage.list_rounds(limit=1000)
        summaries = ModelRegistry(storage).summaries()
        out: dict[str, Any] = {
            "rounds": [
                {
                    "round_id": r.round_id,
                    "status": r.status.key,
                    "model_version": r.model_version,
                    "participants": list(r.participants),
                }
                for r in sorted(rounds, key=lambda r: r.round_id)
            ],
            "model_versions": storage.list_model_versions(),
            "models": [
                {
                    "version": m.version,
                    "origin": m.origin,
                    "sha256": m.digest,
                    "parameters": m.parameters,
                    "parent": m.parent,
                }
                for m in summaries
            ],
            "started_from": None if not summaries else lineage_start(summaries, summaries[-1].version).origin,
            "devices": [
                {"device_id": d.device_id, "revoked": d.revoked}
                for d in sorted(storage.list_devices(), key=lambda d: d.device_id)
            ],
        }
    print(json.dumps(out, sort_keys=True))
    return 0


def _initial_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--classes",
        type=int,
        choices=sorted(SHIPPED_V),
        default=6,
        help="class set of the central v (default: 6)",
    )
    p.add_argument(
        "--initial-model",
        choices=INITIAL_MODELS,
        default="shipped",
        help="model version 1: the shipped trained v for --classes (default), a fixed-seed random init of "
        "the same layout (random), or nothing (none: run import-model before the first round)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of --initial-model random (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    """The ``fedfer-aggregator`` argument parser."""
    parser = argparse.ArgumentParser(prog="fedfer-aggregator", description="fedfer cloud aggregator")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "init", help="create a deployment directory (CA, server certificate, config, the initial central v)"
    )
    p.add_argument("dir", type=Path)
    _initial_model_flags(p)
    p.add_argument("--listen", default="127.0.0.1:50051")
    p.add_argument("--min-clients", type=int, default=8)
    p.add_argument("--max-clients", type=int, default=1000)
    p.add_argument("--threshold", type=int, default=None, help="Shamir threshold count (default: 2/3)")
    p.add_argument("--complete-graph", action="store_true", help="plain SecAgg instead of SecAgg+")
    p.add_argument("--neighbours", type=int, default=None, help="SecAgg+ degree (default: O(log n))")
    p.add_argument("--deadline-s", type=float, default=60.0, help="deadline of every protocol stage")
    p.add_argument(
        "--straggler-grace-s",
        type=float,
        default=10.0,
        help="a device answering this much after half the others is a straggler for the rest of the round",
    )
    p.add_argument(
        "--round-budget-s", type=float, default=600.0, help="overall time budget of a round's protocol stages"
    )
    p.set_defaults(handler=_cmd_init)

    p = sub.add_parser(
        "create-storage", help="create the schema in the configured database (after editing [storage] url)"
    )
    p.add_argument("dir")
    _initial_model_flags(p)
    p.set_defaults(handler=_cmd_create_storage)

    p = sub.add_parser("token", help="print a one-time enrollment token")
    p.add_argument("dir")
    p.add_argument("--label", default="")
    p.add_argument("--ttl-hours", type=float, default=24.0)
    p.set_defaults(handler=_cmd_token)

    p = sub.add_parser("import-model", help="publish a .npz of named float32 arrays as the next central v")
    p.add_argument("dir")
    p.add_argument("file", type=Path)
    p.set_defaults(handler=_cmd_import_model)

    p = sub.add_parser("serve", help="run the gRPC service and the rounds")
    p.add_argument("--config", required=True, help="DIR/aggregator.toml (or the deployment DIR)")
    p.add_argument("--enroll-listen", default=None, help="HOST:PORT of enrollment (default: listen port + 1)")
    p.add_argument(
        "--health-listen",
        default=None,
        help="HOST:PORT of a plaintext port serving only grpc.health.v1 (for kubelet gRPC probes)",
    )
    p.add_argument(
        "--advertise-port",
        type=int,
        default=None,
        help="federation port to tell enrolling devices (default: the bound port; set behind a balancer)",
    )
    p.add_argument(
        "--lease-ttl-s",
        type=float,
        default=15.0,
        help="coordinator lease lifetime: a standby takes over at most this long after the leader died",
    )
    p.add_argument("--ports-file", type=Path, default=None, help="write the bound ports here as JSON")
    p.add_argument(
        "--response-retention-s",
        type=float,
        default=3600.0,
        help="idempotency records (stored answers to request ids) are deleted after this long",
    )
    p.add_argument("--rounds", type=int, default=0, help="stop after this many published rounds (0 = never)")
    p.add_argument("--checkin-s", type=float, default=5.0, help="check-in window once min clients joined")
    p.add_argument("--clip", type=float, default=1.0, help="clip each update coordinate to [-clip, clip]")
    p.add_argument(
        "--max-weight", type=int, default=10_000, help="largest weight (example count) a device may use"
    )
    p.add_argument("--max-dim", type=int, default=0, help="size limits for updates of at least this length")
    p.set_defaults(handler=lambda a: asyncio.run(_serve(a)))

    p = sub.add_parser("revoke", help="revoke a device; its certificate is refused from now on")
    p.add_argument("dir")
    p.add_argument("device_id")
    p.set_defaults(handler=_cmd_revoke)

    p = sub.add_parser("status", help="print devices, rounds and model versions as JSON")
    p.add_argument("dir")
    p.set_defaults(handler=_cmd_status)
    return parser


#: gRPC reads this once, when it is imported, and applies it to the TLS 1.2 cipher list only.
GRPC_CIPHER_ENV = "GRPC_SSL_CIPHER_SUITES"
#: A TLS 1.2 list whose only suite needs a pre-shared key the server never has: no TLS 1.2 handshake can
#: succeed, while TLS 1.3 (whose suites BoringSSL fixes) is unaffected. grpcio exposes no minimum TLS version.
TLS13_ONLY_CIPHERS = "ECDHE-PSK-CHACHA20-POLY1305"


def _tls13_only_process(args: argparse.Namespace, *, from_command_line: bool) -> None:
    """Make ``serve`` refuse TLS 1.2 at the handshake: re-execute once with the cipher list set.

    The variable must be in the environment before grpc is imported, and this module imports it, so the
    process replaces itself (same pid, same arguments) with ``python -m fedfer.aggregator`` and the variable
    set.
    """
    if args.command != "serve" or os.environ.get(GRPC_CIPHER_ENV) == TLS13_ONLY_CIPHERS:
        return
    if not from_command_line:
        _log.warning("serving in-process: TLS 1.2 clients are refused per call, not at the handshake")
        return
    env = {**os.environ, GRPC_CIPHER_ENV: TLS13_ONLY_CIPHERS}
    sys.stdout.flush()
    sys.stderr.flush()
    # Fixed program (this interpreter) and this process's own arguments: no shell, nothing from outside.
    os.execve(sys.executable, [sys.executable, "-m", "fedfer.aggregator", *sys.argv[1:]], env)  # noqa: S606


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run one aggregator command; fedfer errors exit with status 2."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _tls13_only_process(args, from_command_line=argv is None)
    try:
        return int(args.handler(args))
    except FedferError as exc:
        print(f"fedfer-aggregator: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
