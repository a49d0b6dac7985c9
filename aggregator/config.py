"""The aggregator's deployment configuration: typed, validated, loaded from TOML.

A deployment directory made by :func:`init_deployment` looks like::

    <dir>/                  0700
      aggregator.toml       0600  this configuration
      aggregator.db         0600  SQLite storage (unless a PostgreSQL URL is configured), with the initial
                                  central v as model version 1 when one is given
      pki/ca.pem            0644  CA certificate (give it to devices)
      pki/ca.key            0600  CA private key
      pki/server.pem        0644  server certificate (SAN: localhost, 127.0.0.1, configured names)
      pki/server.key        0600  server private key

The TOML file has the sections ``[server]``, ``[tls]``, ``[storage]``, ``[rounds]`` (with
``[rounds.deadlines]``) and ``[enrollment]``; relative paths are resolved against the file's directory and
unknown keys are errors (a typo must not silently fall back to a default). Every error names the bad key.
Defaults are the secure choice: loopback listen address, mutual TLS, SecAgg+ on, 2/3 threshold.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedfer.aggregator.enrollment import IssuedToken, issue_token
from fedfer.aggregator.registry import ModelRegistry
from fedfer.aggregator.secret_files import (
    ensure_private_dir,
    read_secret_file,
    write_public_file,
    write_secret_file,
)
from fedfer.aggregator.shipped import InitialModel
from fedfer.aggregator.storage import open_storage
from fedfer.aggregator.storage.factory import redact_url
from fedfer.security.errors import ValidationError
from fedfer.security.pki import CertificateAuthority, TlsPrivateKey

__all__ = [
    "CONFIG_FILENAME",
    "AggregatorConfig",
    "ConfigError",
    "RoundConfig",
    "StageDeadlines",
    "TlsPaths",
    "create_enrollment_token",
    "init_deployment",
    "load_config",
    "read_certificate_authority",
    "read_server_tls",
]

CONFIG_FILENAME = "aggregator.toml"
_MAX_MESSAGE_FLOOR = 64 * 1024
_MAX_MESSAGE_CEIL = 1024 * 1024 * 1024


class ConfigError(ValidationError):
    """The deployment configuration is invalid; the message names the offending key."""


def _int(key: str, value: object, *, low: int, high: int | None = None) -> int:
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{key}: must be an integer {bound}")
    return value


def _number(value: object) -> float | None:
    """``value`` as a finite float if it is an int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _seconds(key: str, value: object) -> float:
    seconds = _number(value)
    if seconds is None or not 0 < seconds <= 86_400:
        raise ConfigError(f"{key}: must be a number of seconds in (0, 86400]")
    return seconds


@dataclass(frozen=True, kw_only=True)
class StageDeadlines:
    """Per-stage deadlines in seconds; a client that misses one is treated as dropped.

    Attributes:
        advertise_keys_s: Collecting public keys.
        share_keys_s: Collecting encrypted Shamir shares.
        masked_input_s: Collecting masked updates (the big upload; longest by default).
        consistency_check_s: Collecting the survivors' signatures over the survivor set.
        unmask_s: Collecting unmasking shares.
    """

    advertise_keys_s: float = 60.0
    share_keys_s: float = 60.0
    masked_input_s: float = 300.0
    consistency_check_s: float = 60.0
    unmask_s: float = 60.0

    def __post_init__(self) -> None:
        for f in fields(self):
            _seconds(f"rounds.deadlines.{f.name}", getattr(self, f.name))


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    """How rounds are run.

    Attributes:
        min_clients: Clients needed to start a round (and the least that may be sampled).
        max_clients: Largest number of clients in one round.
        threshold: Shamir threshold as a count of clients; exclusive with ``threshold_fraction``.
        threshold_fraction: Threshold as a fraction of the round's clients (used when ``threshold`` is None).
        secagg_plus: Use the SecAgg+ sparse neighbour graph instead of the complete graph.
        neighbours: SecAgg+ graph degree; None chooses it from the number of clients.
        deadlines: Per-stage deadlines.
        straggler_grace_s: A device whose message of a stage comes more than this after half of that stage's
            messages is a straggler for the rest of the round; later stages wait at most this long for it once
            every other device has answered.
        budget_s: Overall time budget of a round's protocol stages (no stage deadline runs past it).
    """

    min_clients: int = 8
    max_clients: int = 1000
    threshold: int | None = None
    threshold_fraction: float = 2 / 3
    secagg_plus: bool = True
    neighbours: int | None = None
    deadlines: StageDeadlines = field(default_factory=StageDeadlines)
    straggler_grace_s: float = 10.0
    budget_s: float = 600.0

    def __post_init__(self) -> None:
        _int("rounds.min_clients", self.min_clients, low=2)
        _int("rounds.max_clients", self.max_clients, low=self.min_clients, high=100_000)
        if self.threshold is not None:
            _int("rounds.threshold", self.threshold, low=2, high=self.min_clients)
        frac = _number(self.threshold_fraction)
        if frac is None or not 0.5 < frac <= 1.0:
            raise ConfigError("rounds.threshold_fraction: must be a number in (0.5, 1]")
        if type(self.secagg_plus) is not bool:
            raise ConfigError("rounds.secagg_plus: must be true or false")
        if self.neighbours is not None:
            _int("rounds.neighbours", self.neighbours, low=2, high=self.max_clients - 1)
            if not self.secagg_plus:
                raise ConfigError("rounds.neighbours: only meaningful with secagg_plus = true")
        if not isinstance(self.deadlines, StageDeadlines):
            raise ConfigError("rounds.deadlines: must be a table of stage deadlines")
        _seconds("rounds.straggler_grace_s", self.straggler_grace_s)
        _seconds("rounds.budget_s", self.budget_s)

    def threshold_for(self, num_clients: int) -> int:
        """Return the Shamir threshold for a round of ``num_clients`` clients.

        Raises:
            ConfigError: ``num_clients`` is below ``min_clients`` or above ``max_clients``.
        """
        if type(num_clients) is not int or not self.min_clients <= num_clients <= self.max_clients:
            raise ConfigError("number of clients is outside [rounds.min_clients, rounds.max_clients]")
        if self.threshold is not None:
            return self.threshold
        return max(2, min(num_clients, math.ceil(self.threshold_fraction * num_clients)))


@dataclass(frozen=True, kw_only=True)
class TlsPaths:
    """Where the deployment's PKI files live.

    Attributes:
        ca_cert: CA certificate (PEM).
        ca_key: CA private key (PEM, must be 0600).
        server_cert: Server certificate (PEM).
        server_key: Server private key (PEM, must be 0600).
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), Path):
                raise ConfigError(f"tls.{f.name}: must be a path")


def _check_listen(value: object) -> str:
    if type(value) is not str or ":" not in value:
        raise ConfigError("server.listen: must be 'host:port'")
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError("server.listen: must be 'host:port' with a port in 0..65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost" and not all(part.isalnum() or "-" in part for part in host.split(".")):
            raise ConfigError("server.listen: host must be an IP address or a DNS name") from None
    return value


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    """A whole aggregator deployment.

    Attributes:
        listen: ``host:port`` the gRPC server binds (loopback by default).
        storage_url: Storage URL (``sqlite:///...`` or ``postgresql://...``).
        tls: PKI file locations.
        rounds: Round parameters.
        max_message_bytes: Largest gRPC message accepted or sent.
        certificate_validity_days: Lifetime of device certificates issued at enrollment.
        token_ttl_hours: Default lifetime of enrollment tokens.
        source: The file this was loaded from, if any.
    """

    listen: str = "127.0.0.1:50051"
    storage_url: str
    tls: TlsPaths
    rounds: RoundConfig = field(default_factory=RoundConfig)
    max_message_bytes: int = 16 * 1024 * 1024
    certificate_validity_days: int = 365
    token_ttl_hours: float = 24.0
    source: Path | None = None

    def __post_init__(self) -> None:
        _check_listen(self.listen)
        if type(self.storage_url) is not str or not self.storage_url.startswith(
            ("sqlite:", "postgresql://", "postgres://")
        ):
            raise ConfigError("storage.url: must start with sqlite: or postgresql://")
        if not isinstance(self.tls, TlsPaths):
            raise ConfigError("tls: must be a TlsPaths")
        if not isinstance(self.rounds, RoundConfig):
            raise ConfigError("rounds: must be a RoundConfig")
        _int(
            "server.max_message_bytes", self.max_message_bytes, low=_MAX_MESSAGE_FLOOR, high=_MAX_MESSAGE_CEIL
        )
        _int("enrollment.certificate_validity_days", self.certificate_validity_days, low=1, high=3650)
        ttl = _number(self.token_ttl_hours)
        if ttl is None or not 0 < ttl <= 90 * 24:
            raise ConfigError("enrollment.token_ttl_hours: must be a number of hours in (0, 2160]")

    def __repr__(self) -> str:
        return (
            f"AggregatorConfig(listen={self.listen!r}, storage_url={redact_url(self.storage_url)!r}, "
            f"source={self.source!r})"
        )

    @property
    def certificate_validity(self) -> dt.timedelta:
        """Device certificate lifetime."""
        return dt.timedelta(days=self.certificate_validity_days)

    @property
    def token_ttl(self) -> dt.timedelta:
        """Default enrollment token lifetime."""
        return dt.timedelta(hours=float(self.token_ttl_hours))

    def to_toml(self) -> str:
        """Render this configuration as TOML that :func:`load_config` reads back identically."""
        r, d = self.rounds, self.rounds.deadlines
        lines = [
            "# fedfer aggregator deployment (see aggregator/config.py for every key)",
            "[server]",
            f"listen = {_toml_str(self.listen)}",
            f"max_message_bytes = {self.max_message_bytes}",
            "",
            "[tls]",
            *(f"{f.name} = {_toml_str(str(getattr(self.tls, f.name)))}" for f in fields(self.tls)),
            "",
            "[storage]",
            f"url = {_toml_str(self.storage_url)}",
            "",
            "[rounds]",
            f"min_clients = {r.min_clients}",
            f"max_clients = {r.max_clients}",
            *([f"threshold = {r.threshold}"] if r.threshold is not None else []),
            f"threshold_fraction = {float(r.threshold_fraction)!r}",
            f"secagg_plus = {'true' if r.secagg_plus else 'false'}",
            *([f"neighbours = {r.neighbours}"] if r.neighbours is not None else []),
            f"straggler_grace_s = {float(r.straggler_grace_s)!r}",
            f"budget_s = {float(r.budget_s)!r}",
            "",
            "[rounds.deadlines]",
            *(f"{f.name} = {float(getattr(d, f.name))!r}" for f in fields(d)),
            "",
            "[enrollment]",
            f"certificate_validity_days = {self.certificate_validity_days}",
            f"token_ttl_hours = {float(self.token_ttl_hours)!r}",
            "",
        ]
        return "\n".join(lines)


def _toml_str(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 0x20 for c in escaped):
        raise ConfigError("configuration strings must not contain control characters")
    return f'"{escaped}"'


def _table(data: Mapping[str, Any], key: str, allowed: Iterable[str], *, parent: str = "") -> dict[str, Any]:
    name = f"{parent}.{key}" if parent else key
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a table")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key")
    return value


def _resolve(base: Path, key: str, value: object) -> Path:
    if type(value) is not str or not value:
        raise ConfigError(f"{key}: must be a non-empty path string")
    path = Path(value)
    return path if path.is_absolute() else (base / path)


def _resolve_storage_url(base: Path, value: object) -> str:
    if type(value) is not str:
        raise ConfigError("storage.url: must be a string")
    if value.startswith("sqlite:") and not value.startswith("sqlite:///"):
        # sqlite:relative.db is relative to the configuration file.
        return f"sqlite://{(base / value.removeprefix('sqlite:')).resolve()}"
    return value


def load_config(path: str | os.PathLike[str]) -> AggregatorConfig:
    """Read and validate an aggregator TOML configuration.

    Raises:
        ConfigError: The file is unreadable, not TOML, or a key is missing, unknown or invalid (named).
    """
    source = Path(path).resolve()
    try:
        with source.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {source}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration {source} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"server", "tls", "storage", "rounds", "enrollment"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section")
    base = source.parent
    server = _table(data, "server", ["listen", "max_message_bytes"])
    tls = _table(data, "tls", ["ca_cert", "ca_key", "server_cert", "server_key"])
    storage = _table(data, "storage", ["url"])
    rounds = _table(
        data,
        "rounds",
        [
            "min_clients",
            "max_clients",
            "threshold",
            "threshold_fraction",
            "secagg_plus",
            "neighbours",
            "deadlines",
            "straggler_grace_s",
            "budget_s",
        ],
    )
    enrollment = _table(data, "enrollment", ["certificate_validity_days", "token_ttl_hours"])
    deadline_names = [f.name for f in fields(StageDeadlines)]
    deadlines = _table(rounds, "deadlines", deadline_names, parent="rounds")
    for name in ("ca_cert", "ca_key", "server_cert", "server_key"):
        if name not in tls:
            raise ConfigError(f"tls.{name}: missing")
    if "url" not in storage:
        raise ConfigError("storage.url: missing")
    try:
        round_config = RoundConfig(
            **{k: v for k, v in rounds.items() if k != "deadlines"},
            deadlines=StageDeadlines(**deadlines),
        )
        return AggregatorConfig(
            **server,
            storage_url=_resolve_storage_url(base, storage["url"]),
            tls=TlsPaths(**{k: _resolve(base, f"tls.{k}", v) for k, v in tls.items()}),
            rounds=round_config,
            **enrollment,
            source=source,
        )
    except TypeError as exc:  # defensive: unknown keys are caught above
        raise ConfigError(f"invalid configuration: {exc}") from None


def read_certificate_authority(config: AggregatorConfig) -> CertificateAuthority:
    """Load the deployment CA (its key file must be 0600).

    Raises:
        ValidationError: Missing or unreadable files, loose permissions, or a key that does not match.
    """
    try:
        cert_pem = config.tls.ca_cert.read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls.ca_cert: cannot read {config.tls.ca_cert}: {exc.strerror}") from None
    key = TlsPrivateKey.from_pem(read_secret_file(config.tls.ca_key))
    return CertificateAuthority.load(certificate_pem=cert_pem, private_key=key)


def read_server_tls(config: AggregatorConfig) -> tuple[bytes, bytes, bytes]:
    """Return ``(server_key_pem, server_cert_pem, ca_cert_pem)`` for ``grpc.ssl_server_credentials``.

    The key file must be 0600; the returned key PEM is secret (do not log it).

    Raises:
        ValidationError: Missing or unreadable files, loose permissions, or a malformed key.
    """
    key_pem = read_secret_file(config.tls.server_key)
    TlsPrivateKey.from_pem(key_pem)  # refuse a malformed key here rather than deep inside gRPC
    try:
        cert_pem = config.tls.server_cert.read_bytes()
        ca_pem = config.tls.ca_cert.read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls: cannot read certificate: {exc.strerror}") from None
    return key_pem, cert_pem, ca_pem


def init_deployment(
    directory: str | os.PathLike[str],
    *,
    listen: str = "127.0.0.1:50051",
    storage_url: str | None = None,
    server_dns_names: Iterable[str] = (),
    server_ip_addresses: Iterable[str] = (),
    ca_common_name: str = "fedfer deployment CA",
    ca_validity: dt.timedelta = dt.timedelta(days=3650),
    server_validity: dt.timedelta = dt.timedelta(days=825),
    rounds: RoundConfig | None = None,
    initial_model: InitialModel | None = None,
    now: dt.datetime | None = None,
) -> AggregatorConfig:
    """Create a deployment: CA, server certificate and key, configuration file and migrated storage.

    The configuration file is written last, after ``initial_model`` (if any) is published as model version
    1, so a deployment either has its configuration and its first model or is not a deployment at all
    (every command refuses a directory without ``aggregator.toml``; ``init`` can be run on it again).

    Args:
        directory: Deployment directory (created 0700; must not already hold a configuration).
        listen: ``host:port`` for the server.
        storage_url: Defaults to ``sqlite:///<directory>/aggregator.db``.
        server_dns_names: Extra DNS names for the server certificate (``localhost`` is always included).
        server_ip_addresses: Extra IP addresses for it (``127.0.0.1`` is always included).
        ca_common_name: Subject of the CA certificate.
        ca_validity: CA lifetime.
        server_validity: Server certificate lifetime (capped by the CA's).
        rounds: Round parameters (defaults to :class:`RoundConfig` defaults).
        initial_model: The first central v (``fedfer-aggregator init`` passes the shipped one by default),
            published as version 1 with its origin; None publishes nothing (``import-model`` does later).
        now: Current time (defaults to the clock).

    Returns:
        The configuration as loaded back from the written file.

    Raises:
        ConfigError: The directory already holds a deployment, or an argument is invalid.
    """
    when = dt.datetime.now(dt.UTC) if now is None else now
    root = ensure_private_dir(Path(directory).resolve())
    config_path = root / CONFIG_FILENAME
    if config_path.exists():
        raise ConfigError(f"{config_path} already exists; refusing to overwrite a deployment")
    pki = ensure_private_dir(root / "pki")
    config = AggregatorConfig(
        listen=listen,
        storage_url=storage_url if storage_url is not None else f"sqlite://{root / 'aggregator.db'}",
        tls=TlsPaths(
            ca_cert=pki / "ca.pem",
            ca_key=pki / "ca.key",
            server_cert=pki / "server.pem",
            server_key=pki / "server.key",
        ),
        rounds=rounds if rounds is not None else RoundConfig(),
    )
    ca = CertificateAuthority.create(common_name=ca_common_name, now=when, validity=ca_validity)
    server = ca.issue_server_certificate(
        now=when, validity=server_validity, dns_names=server_dns_names, ip_addresses=server_ip_addresses
    )
    write_secret_file(config.tls.ca_key, ca.private_key.dangerously_export_pem())
    write_public_file(config.tls.ca_cert, ca.certificate_pem)
    write_secret_file(config.tls.server_key, server.private_key.dangerously_export_pem())
    write_public_file(config.tls.server_cert, server.certificate_pem)
    # Create and migrate the schema now (every later command refuses a database without it), with v1 in it.
    with open_storage(config.storage_url, now=when, create=True) as storage:
        if initial_model is not None:
            ModelRegistry(storage, clock=lambda: when).publish(
                1, initial_model.arrays, parent=None, origin=initial_model.origin
            )
    write_secret_file(config_path, config.to_toml().encode("utf-8"))
    return load_config(config_path)


def create_enrollment_token(
    config: AggregatorConfig,
    *,
    label: str = "",
    ttl: dt.timedelta | None = None,
    now: dt.datetime | None = None,
) -> IssuedToken:
    """Create a one-time enrollment token in the deployment's storage.

    Args:
        config: The deployment.
        label: Operator's note stored with the token hash.
        ttl: Lifetime; defaults to ``enrollment.token_ttl_hours``.
        now: Current time (defaults to the clock).
    """
    when = dt.datetime.now(dt.UTC) if now is None else now
    lifetime = config.token_ttl if ttl is None else ttl
    with open_storage(config.storage_url, now=when) as storage:
        return issue_token(storage, now=when, ttl=lifetime, label=label)
