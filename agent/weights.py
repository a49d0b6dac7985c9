"""Model files for devices in the field: download by URL, pin by SHA-256, or take a local path.

A device never trusts a model file because of where it came from: every file, downloaded or given by path,
is hashed and compared with the pinned digest before anything parses it; a mismatch is refused with
:class:`agent.mobilenet.WeightsError` and a partial download never lands under the final name.

Pinned files:

* :data:`TORCHVISION_MOBILENET_V2`: torchvision's official ImageNet weights ``mobilenet_v2-b0353104.pth``.
  torchvision pins these by the SHA-256 prefix embedded in the file name (``torch.hub``'s ``check_hash``
  convention), which is what is pinned here; pin the full digest with :class:`PinnedFile` once it has been
  recorded on a connected machine.
* :data:`MEDIAPIPE_FACE_DETECTOR`: MediaPipe's BlazeFace short-range detector, full SHA-256 (the digest
  MediaPipe's own build pins for this URL, identical to the file in ``../shared/models/mediapipe``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from agent.mobilenet import WeightsError
from security.errors import ValidationError

__all__ = [
    "MEDIAPIPE_FACE_DETECTOR",
    "TORCHVISION_MOBILENET_V2",
    "PinnedFile",
    "ensure_file",
    "sha256_file",
    "verify_sha256",
]

_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_CHUNK = 1 << 20


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
        sha256: lowercase hex digest; 64 digits, or a prefix of at least 8 (torch.hub convention).
        filename: name under which it is stored in the download directory.
        max_bytes: downloads larger than this are refused.
    """

    url: str
    sha256: str
    filename: str
    max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not _HEX.match(self.sha256) or len(self.sha256) % 2:
            raise ValidationError("sha256 must be lowercase hex, 8 to 64 digits")
        if not self.filename or Path(self.filename).name != self.filename:
            raise ValidationError("filename must be a plain file name")
        if self.max_bytes < 1:
            raise ValidationError("max_bytes must be positive")
        _check_url(self.url)


TORCHVISION_MOBILENET_V2 = PinnedFile(
    url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    sha256="b0353104",
    filename="mobilenet_v2-b0353104.pth",
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
    """Return ``path`` if its SHA-256 matches ``expected`` (full hex digest or prefix of >= 8 digits).

    Raises:
        ValidationError: ``expected`` is not a hex digest or prefix.
        WeightsError: the file is unreadable or its digest differs.
    """
    expected = expected.lower()
    if not _HEX.match(expected):
        raise ValidationError("expected sha256 must be hex, 8 to 64 digits")
    actual = sha256_file(path)
    if not hmac.compare_digest(actual[: len(expected)], expected):
        raise WeightsError(f"SHA-256 of {Path(path).name} does not match the pinned digest; file refused")
    return Path(path)


def _download(pinned: PinnedFile, dest: Path, *, timeout: float) -> None:
    _check_url(pinned.url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".download-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(pinned.url, timeout=timeout) as resp:  # noqa: S310 - scheme checked
                    while chunk := resp.read(_CHUNK):
                        size += len(chunk)
                        if size > pinned.max_bytes:
                            raise WeightsError(
                                f"download of {pinned.filename} exceeds {pinned.max_bytes} bytes"
                            )
                        digest.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                raise WeightsError(f"cannot download {pinned.filename}") from exc
            out.flush()
            os.fsync(out.fileno())
        if not hmac.compare_digest(digest.hexdigest()[: len(pinned.sha256)], pinned.sha256):
            raise WeightsError(
                f"SHA-256 of downloaded {pinned.filename} does not match the pinned digest; file refused"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_file(
    pinned: PinnedFile,
    *,
    local_path: str | Path | None = None,
    download_dir: str | Path | None = None,
    timeout: float = 60.0,
) -> Path:
    """A verified local copy of ``pinned``.

    With ``local_path`` the file there is verified and returned (nothing is downloaded). Otherwise the copy in
    ``download_dir`` is used if present and valid, else downloaded into a temporary file, verified and renamed
    into place.

    Args:
        pinned: what to fetch and the digest it must have.
        local_path: a file already on the device (for example shipped with the installer).
        download_dir: where downloads are kept (default ``<cache>/models``, see
            :func:`agent.tflite_convert.default_cache_dir`).
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
        return verify_sha256(path, pinned.sha256)
    if download_dir is None:
        from agent.tflite_convert import default_cache_dir

        download_dir = default_cache_dir() / "models"
    dest = Path(download_dir) / pinned.filename
    if dest.is_file():
        try:
            return verify_sha256(dest, pinned.sha256)
        except WeightsError:
            dest.unlink()  # a stale or corrupted copy is replaced by a fresh download
    _download(pinned, dest, timeout=timeout)
    return dest
