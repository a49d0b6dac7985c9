"""Deployment configuration: init_deployment, TOML loading with named errors, secret files and tokens."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from fedfer.aggregator.config import (
    AggregatorConfig,
    ConfigError,
    RoundConfig,
    StageDeadlines,
    TlsPaths,
    create_enrollment_token,
    init_deployment,
    load_config,
    read_certificate_authority,
    read_server_tls,
)
from fedfer.aggregator.enrollment import EnrollmentService
from fedfer.aggregator.secret_files import (
    InsecureFileError,
    ensure_private_dir,
    read_secret_file,
    write_public_file,
    write_secret_file,
)
from fedfer.aggregator.storage import open_storage
from fedfer.security import pki
from fedfer.security.errors import ValidationError
from fedfer.security.keys import IdentityKey

NOW = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> AggregatorConfig:
    root = tmp_path_factory.mktemp("deploy") / "agg"
    return init_deployment(
        root, server_dns_names=["agg.example.org"], server_ip_addresses=["10.1.2.3"], now=NOW
    )


def test_init_deployment_layout_and_modes(deployment: AggregatorConfig) -> None:
    assert deployment.source is not None
    root = deployment.source.parent
    assert mode(root) == 0o700 and mode(root / "pki") == 0o700
    assert mode(deployment.source) == 0o600
    assert mode(deployment.tls.ca_key) == 0o600 and mode(deployment.tls.server_key) == 0o600
    assert mode(deployment.tls.ca_cert) == 0o644 and mode(deployment.tls.server_cert) == 0o644
    assert deployment.storage_url == f"sqlite://{root / 'aggregator.db'}"
    assert (root / "aggregator.db").exists()
    assert deployment.listen == "127.0.0.1:50051" and deployment.rounds == RoundConfig()
    assert not [p for p in root.rglob("*.tmp")]


def test_init_deployment_pki_works(deployment: AggregatorConfig) -> None:
    ca = read_certificate_authority(deployment)
    key_pem, cert_pem, ca_pem = read_server_tls(deployment)
    assert ca_pem == ca.certificate_pem and b"PRIVATE KEY" in key_pem
    assert pki.certificate_fingerprint(cert_pem) != ca.fingerprint
    san = x509.load_pem_x509_certificate(cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert set(san.value.get_values_for_type(x509.DNSName)) == {"localhost", "agg.example.org"}
    assert {str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    # The CA read back from disk enrolls a device whose certificate verifies against the written CA file.
    issued = create_enrollment_token(deployment, label="first", now=NOW)
    assert issued.expires_at == NOW + dt.timedelta(hours=24)
    with open_storage(deployment.storage_url) as storage:
        service = EnrollmentService(storage=storage, ca=ca, clock=lambda: NOW)
        csr = pki.create_device_csr(
            device_id="dev-1", tls_key=pki.TlsPrivateKey.generate(), identity_key=IdentityKey.generate()
        )
        result = service.enroll(token=issued.token, csr_pem=csr)
    identity = pki.verify_device_certificate(result.certificate_pem, ca_certificate_pem=ca_pem, now=NOW)
    assert identity.device_id == "dev-1"


def test_init_refuses_to_overwrite(deployment: AggregatorConfig) -> None:
    assert deployment.source is not None
    before = deployment.tls.ca_key.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        init_deployment(deployment.source.parent, now=NOW)
    assert deployment.tls.ca_key.read_bytes() == before


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = AggregatorConfig(
        listen="0.0.0.0:7443",
        storage_url="postgresql://agg@db:5432/fedfer",
        tls=TlsPaths(
            ca_cert=tmp_path / "a",
            ca_key=tmp_path / "b",
            server_cert=tmp_path / "c",
            server_key=tmp_path / "d",
        ),
        rounds=RoundConfig(
            min_clients=10,
            max_clients=200,
            threshold=7,
            neighbours=8,
            deadlines=StageDeadlines(unmask_s=12.5),
        ),
        max_message_bytes=8 * 1024 * 1024,
        certificate_validity_days=30,
        token_ttl_hours=2,
    )
    path = tmp_path / "agg.toml"
    path.write_text(config.to_toml())
    loaded = load_config(path)
    assert loaded == AggregatorConfig(**{**config.__dict__, "source": path.resolve()})
    assert loaded.rounds.threshold_for(100) == 7
    assert loaded.token_ttl == dt.timedelta(hours=2) and loaded.certificate_validity == dt.timedelta(days=30)


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agg.toml"
    path.write_text(
        '[tls]\nca_cert = "pki/ca.pem"\nca_key = "pki/ca.key"\n'
        'server_cert = "s.pem"\nserver_key = "/abs/s.key"\n'
        '[storage]\nurl = "sqlite:data/agg.db"\n'
    )
    config = load_config(path)
    assert config.tls.ca_cert == tmp_path / "pki/ca.pem"
    assert config.tls.server_key == Path("/abs/s.key")
    assert config.storage_url == f"sqlite://{tmp_path / 'data/agg.db'}"


BASE = (
    '[tls]\nca_cert = "a"\nca_key = "b"\nserver_cert = "c"\nserver_key = "d"\n'
    '[storage]\nurl = "sqlite:x.db"\n'
)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[rounds]\nmin_clients = 1\n", "rounds.min_clients"),
        ("[rounds]\nmin_clients = true\n", "rounds.min_clients"),
        ("[rounds]\nmin_clients = 5\nthreshold = 6\n", "rounds.threshold"),
        ("[rounds]\nthreshold_fraction = 0.5\n", "rounds.threshold_fraction"),
        ("[rounds]\nthreshold_fraction = nan\n", "rounds.threshold_fraction"),
        ("[rounds]\nsecagg_plus = 1\n", "rounds.secagg_plus"),
        ("[rounds]\nsecagg_plus = false\nneighbours = 4\n", "rounds.neighbours"),
        ("[rounds]\nmin_client = 5\n", "rounds.min_client"),
        ("[rounds.deadlines]\nunmask_s = 0\n", "rounds.deadlines.unmask_s"),
        ("[rounds.deadlines]\nshare_keys_s = inf\n", "rounds.deadlines.share_keys_s"),
        ("[rounds.deadlines]\nsharekeys_s = 5\n", "rounds.deadlines.sharekeys_s"),
        ('[server]\nlisten = "localhost"\n', "server.listen"),
        ('[server]\nlisten = "127.0.0.1:70000"\n', "server.listen"),
        ("[server]\nmax_message_bytes = 10\n", "server.max_message_bytes"),
        ("[enrollment]\ntoken_ttl_hours = 0\n", "enrollment.token_ttl_hours"),
        ("[enrollment]\ncertificate_validity_days = 4000\n", "enrollment.certificate_validity_days"),
        ("[telemetry]\non = true\n", "telemetry"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, extra: str, key: str) -> None:
    path = tmp_path / "agg.toml"
    path.write_text(BASE + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(key + ":")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tls\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_text(BASE.replace('server_key = "d"\n', ""))
    with pytest.raises(ConfigError, match=r"^tls\.server_key: missing"):
        load_config(bad)
    bad.write_text(BASE.replace('url = "sqlite:x.db"', 'url = "mysql://x"'))
    with pytest.raises(ConfigError, match=r"^storage\.url"):
        load_config(bad)


def test_threshold_for() -> None:
    rounds = RoundConfig(min_clients=3, max_clients=100)
    assert [rounds.threshold_for(n) for n in (3, 10, 100)] == [2, 7, 67]
    with pytest.raises(ConfigError):
        rounds.threshold_for(2)
    with pytest.raises(ConfigError):
        rounds.threshold_for(101)


def test_repr_redacts_storage_password(tmp_path: Path) -> None:
    tls = TlsPaths(ca_cert=tmp_path, ca_key=tmp_path, server_cert=tmp_path, server_key=tmp_path)
    config = AggregatorConfig(storage_url="postgresql://agg:s3cr3t@db/fedfer", tls=tls)
    assert "s3cr3t" not in repr(config)


def test_loose_key_permissions_are_refused(tmp_path: Path) -> None:
    config = init_deployment(tmp_path / "dep", now=NOW)
    config.tls.ca_key.chmod(0o644)
    with pytest.raises(InsecureFileError, match="chmod 600"):
        read_certificate_authority(config)
    config.tls.server_key.chmod(0o640)
    with pytest.raises(InsecureFileError):
        read_server_tls(config)


# -- secret files -------------------------------------------------------------------------------------------


def test_secret_files_are_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_secret_file(tmp_path / "k", b"one")
        write_public_file(tmp_path / "c", b"cert")
    finally:
        os.umask(old)
    assert mode(tmp_path / "k") == 0o600 and mode(tmp_path / "c") == 0o644
    (tmp_path / "k").chmod(0o644)
    write_secret_file(tmp_path / "k", b"two")  # replacing a loose file tightens it
    assert mode(tmp_path / "k") == 0o600 and read_secret_file(tmp_path / "k") == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "k"]


def test_secret_file_refusals(tmp_path: Path) -> None:
    write_secret_file(tmp_path / "k", b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "k")
    with pytest.raises(ValidationError):
        read_secret_file(tmp_path / "link")
    with pytest.raises(ValidationError):
        read_secret_file(tmp_path / "missing")
    with pytest.raises(InsecureFileError):
        read_secret_file(tmp_path)
    with pytest.raises(ValidationError):
        write_secret_file(tmp_path / "nodir" / "k", b"x")
    with pytest.raises(ValidationError):
        write_secret_file(tmp_path / "k", "text")  # type: ignore[arg-type]
    d = ensure_private_dir(tmp_path / "a" / "b")
    assert mode(d) == 0o700
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InsecureFileError):
        ensure_private_dir(tmp_path / "file")
