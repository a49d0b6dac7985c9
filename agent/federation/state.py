"""The device's federation state directory: its keys, certificate, pinned CA and aggregator address.

Layout (directory 0700, private keys 0600, written atomically):

``federation.json``   device id, aggregator host, federation and enrollment ports (no secrets)
``ca.pem``            the aggregator's CA certificate (trusted at enrollment; verifies peers' certificates)
``server.pem``        the aggregator's TLS certificate, pinned at enrollment: the federation channel's only
                      trust anchor
``device.pem``        the device certificate issued at enrollment
``tls_key.pem``       the device's P-256 TLS private key (0600)
``identity_key.pem``  the device's Ed25519 identity key, which signs its round keys (0600)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedfer.security import pki
from fedfer.security.errors import FedferError, ValidationError
from fedfer.security.files import write_atomic
from fedfer.security.keys import IdentityKey

__all__ = ["DeviceState", "StateError", "parse_target", "write_private_file", "write_public_file"]

_META = "federation.json"


class StateError(FedferError):
    """The federation state directory is missing, incomplete or unreadable."""


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically write a secret file readable only by its owner (0600)."""
    write_atomic(path, data, mode=0o600)


def write_public_file(path: Path, data: bytes) -> None:
    """Atomically write a non-secret file (0644)."""
    write_atomic(path, data, mode=0o644)


@dataclass(frozen=True, repr=False)
class DeviceState:
    """What an enrolled device knows about itself and its aggregator.

    Attributes:
        directory: the state directory.
        device_id: the id in the device certificate.
        host: the aggregator's host name (must match its certificate).
        port: the mutual-TLS federation port.
        enroll_port: the enrollment port.
    """

    directory: Path
    device_id: str
    host: str
    port: int
    enroll_port: int

    def __repr__(self) -> str:
        return f"DeviceState(device_id={self.device_id!r}, host={self.host!r}, port={self.port})"

    @property
    def target(self) -> str:
        """``host:port`` of the federation endpoint."""
        return f"{self.host}:{self.port}"

    def ca_pem(self) -> bytes:
        """The pinned CA certificate."""
        return self._read("ca.pem")

    def server_pem(self) -> bytes:
        """The aggregator's TLS certificate pinned at enrollment."""
        return self._read("server.pem")

    def certificate_pem(self) -> bytes:
        """The device certificate."""
        return self._read("device.pem")

    def tls_key(self) -> pki.TlsPrivateKey:
        """Handle of the device's TLS private key."""
        return pki.TlsPrivateKey.from_pem(self._read("tls_key.pem"))

    def identity_key(self) -> IdentityKey:
        """Handle of the device's Ed25519 identity key."""
        return IdentityKey.from_pem(self._read("identity_key.pem"))

    def _read(self, name: str) -> bytes:
        try:
            return (self.directory / name).read_bytes()
        except OSError as exc:
            raise StateError(f"federation state file {name} is missing or unreadable") from exc

    @classmethod
    def load(cls, directory: Path) -> DeviceState:
        """Read an enrolled device's state.

        Raises:
            StateError: the directory holds no (complete) enrollment.
        """
        directory = Path(directory)
        try:
            meta = json.loads((directory / _META).read_text())
            state = cls(
                directory=directory,
                device_id=pki.validate_device_id(meta["device_id"]),
                host=str(meta["host"]),
                port=_port(meta["port"]),
                enroll_port=_port(meta["enroll_port"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError("device is not enrolled (no readable federation state)") from exc
        for name in ("ca.pem", "server.pem", "device.pem", "tls_key.pem", "identity_key.pem"):
            if not (directory / name).is_file():
                raise StateError(f"federation state file {name} is missing")
        return state

    def save_meta(self) -> None:
        """Write ``federation.json`` (no secrets)."""
        meta = {
            "device_id": self.device_id,
            "host": self.host,
            "port": self.port,
            "enroll_port": self.enroll_port,
        }
        write_public_file(self.directory / _META, json.dumps(meta, sort_keys=True).encode())


def _port(value: object) -> int:
    if type(value) is not int or not 0 < value < 65536:
        raise ValidationError("port must be an int in 1..65535")
    return value


def parse_target(target: str) -> tuple[str, int]:
    """Split ``host:port`` into its parts.

    Raises:
        ValidationError: not ``host:port`` with a valid port.
    """
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValidationError("server address must be HOST:PORT")
    return host, _port(int(port))
