"""Model files for devices in the field: download by URL, pin by SHA-256, or take a local path.

A device never trusts a model file because of where it came from: every file, downloaded or given by path,
is hashed and compared with the pinned digest before anything parses it; a mismatch is refused with
:class:`WeightsError` and a partial download never lands under the final name. Pins are
full SHA-256 digests (64 hex digits): a shorter prefix is refused.

Pinned files:

* :data:`TORCHVISION_MOBILENET_V2`: torchvision's official ImageNet weights ``mobilenet_v2-b0353104.pth``
  (14,212,972 bytes). torchvision itself checks only the 8-hex SHA-256 prefix in the file name
  (``torch.hub``'s ``check_hash``, 32 bits); the full digest pinned here is the one published for exactly this
  URL in OpenVINO's Open Model Zoo (``models/public/mobilenet-v2-pytorch/model.yml``), and agrees with that
  prefix, which is checked as well (:attr:`PinnedFile.hub_prefix`).
* :data:`MEDIAPIPE_FACE_DETECTOR`: MediaPipe's BlazeFace short-range detector, full SHA-256 (the digest
  MediaPipe's own build pins for this URL, identical to the file in ``../shared/models/mediapipe``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fedfer.agent.files import cache_dir
from fedfer.security.errors import FedferError, ValidationError
from fedfer.security.files import write_atomic

__all__ = [
    "MEDIAPIPE_FACE_DETECTOR",
    "TORCHVISION_MOBILENET_V2",
    "PinnedFile",
    "WeightsError",
    "ensure_file",
    "pinned_sha256",
    "sha256_file",
    "verify_sha256",
]

_DIGEST = re.compile(r"[0-9a-f]{64}")
_HUB_NAME = re.compile(r".+-([0-9a-f]{8,64})\.[A-Za-z0-9]+")  # torch.hub: <name>-<sha256 prefix>.<ext>
_CHUNK = 1 << 20


class WeightsError(FedferError):
    """A weight file is missing, unreadable, has the wrong hash or does not fit the architecture."""


def pinned_sha256(value: str) -> str:
    """``value`` as a full, lowercase hex SHA-256 digest.

    Raises:
        ValidationError: anything but 64 hex digits (a prefix or an empty digest is refused).
    """
    digest = value.lower() if type(value) is str else ""
    if not _DIGEST.fullmatch(digest):
        raise ValidationError("sha256 must be the full digest, 64 hex digits (no prefix, not empty)")
    return digest


def _check_url(url: str) -> None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("https", "file"):
        return
    if parsed.scheme == "http":
        host = parsed.hostname or ""
        try:
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
        raise ValidationError("plain http is only allowed to a loopback host")
    raise ValidationError("url scheme must be https or file")


@dataclass(frozen=True, slots=True)
class PinnedFile:
    """A downloadable file and the SHA-256 it must have.

    Attributes:
        url: ``https://`` (or ``file://``; ``http://`` only to a loopback host) location.
        sha256: the full lowercase hex SHA-256 (64 digits).
        filename: name under which it is stored in the download directory.
        max_bytes: downloads larger than this are refused.
        hub_prefix: ``filename`` follows torch.hub's ``<name>-<sha256 prefix>.<ext>`` convention; the prefix
            must agree with ``sha256`` and is checked against every file as a second check.
    """

    url: str
    sha256: str
    filename: str
    max_bytes: int = 64 * 1024 * 1024
    hub_prefix: bool = False

    def __post_init__(self) -> None:
        if pinned_sha256(self.sha256) != self.sha256:
            raise ValidationError("sha256 must be lowercase hex")
        if not self.filename or Path(self.filename).name != self.filename:
            raise ValidationError("filename must be a plain file name")
        if self.max_bytes < 1:
            raise ValidationError("max_bytes must be positive")
        if self.hub_prefix and not self.sha256.startswith(self._hub_digest_prefix()):
            raise ValidationError("the file name's torch.hub hash prefix disagrees with the pinned sha256")
        _check_url(self.url)

    def _hub_digest_prefix(self) -> str:
        match = _HUB_NAME.fullmatch(self.filename)
        if match is None:
            raise ValidationError("hub_prefix needs a file name of the form <name>-<hex>.<ext>")
        return match.group(1)

    def matches(self, digest: str) -> bool:
        """Whether a file's hex SHA-256 ``digest`` is the pinned one (with ``hub_prefix``: and its prefix)."""
        full = hmac.compare_digest(digest, self.sha256)
        if not self.hub_prefix:
            return full
        prefix = self._hub_digest_prefix()
        return hmac.compare_digest(digest[: len(prefix)], prefix) and full


TORCHVISION_MOBILENET_V2 = PinnedFile(
    url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    filename="mobilenet_v2-b0353104.pth",
    max_bytes=16 * 1024 * 1024,  # the published file has 14,212,972 bytes
    hub_prefix=True,
)

MEDIAPIPE_FACE_DETECTOR = PinnedFile(
    url="https://storage.googleapis.com/mediapipe-assets/face_detection_short_range.tflite"
    "?generation=1677044301978921",
    sha256="bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
    filename="face_detection_short_range.tflite",
)


def sha256_file(path: str | Path) -> str:
    """The lowercase hex SHA-256 of a file, read in 1 MiB chunks.

    Raises:
        WeightsError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise WeightsError(f"cannot read {Path(path).name}") from exc
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> Path:
    """Return ``path`` if its SHA-256 is ``expected`` (the full 64-digit hex digest).

    Raises:
        ValidationError: ``expected`` is not a full hex digest (a prefix is refused).
        WeightsError: the file is unreadable or its digest differs.
    """
    expected = pinned_sha256(expected)
    if not hmac.compare_digest(sha256_file(path), expected):
        raise _mismatch(Path(path).name)
    return Path(path)


def _verify_pinned(path: Path, pinned: PinnedFile) -> Path:
    if not pinned.matches(sha256_file(path)):
        raise _mismatch(path.name)
    return path


def _mismatch(name: str) -> WeightsError:
    return WeightsError(f"SHA-256 of {name} does not match the pinned digest; file refused")


def _download(pinned: PinnedFile, dest: Path, *, timeout: float) -> None:
    """Fetch ``pinned`` (at most ``max_bytes``, in memory); write it to ``dest`` only if it verifies."""
    _check_url(pinned.url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    chunks: list[bytes] = []
    size = 0
    try:
        with urllib.request.urlopen(pinned.url, timeout=timeout) as resp:  # noqa: S310 - scheme checked
            while chunk := resp.read(_CHUNK):
                size += len(chunk)
                if size > pinned.max_bytes:
                    raise WeightsError(f"download of {pinned.filename} exceeds {pinned.max_bytes} bytes")
                digest.update(chunk)
                chunks.append(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise WeightsError(f"cannot download {pinned.filename}") from exc
    if not pinned.matches(digest.hexdigest()):
        raise WeightsError(
            f"SHA-256 of downloaded {pinned.filename} does not match the pinned digest; file refused"
        )
    write_atomic(dest, b"".join(chunks))


def ensure_file(
    pinned: PinnedFile,
    *,
    local_path: str | Path | None = None,
    download_dir: str | Path | None = None,
    timeout: float = 60.0,
) -> Path:
    """A verified local copy of ``pinned``.

    With ``local_path`` the file there is verified and returned (nothing is downloaded). Otherwise the copy in
    ``download_dir`` is used if present and valid, else downloaded (into memory), verified and written
    atomically.

    Args:
        pinned: what to fetch and the digest it must have.
        local_path: a file already on the device (for example shipped with the installer).
        download_dir: where downloads are kept (default ``<cache>/models``, see
            :func:`fedfer.agent.files.cache_dir`).
        timeout: network timeout in seconds.

    Returns:
        The path of the verified file.

    Raises:
        WeightsError: missing local file, failed download, or digest mismatch.
    """
    if local_path is not None:
        path = Path(local_path)
        if not path.is_file():
            raise WeightsError(f"model file not found: {path}")
        return _verify_pinned(path, pinned)
    if download_dir is None:
        download_dir = cache_dir("models")
    dest = Path(download_dir) / pinned.filename
    if dest.is_file():
        try:
            return _verify_pinned(dest, pinned)
        except WeightsError:
            dest.unlink()  # a stale or corrupted copy is replaced by a fresh download
    _download(pinned, dest, timeout=timeout)
    return dest
