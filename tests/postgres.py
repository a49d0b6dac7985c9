"""A real, throw-away PostgreSQL server for tests.

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` in a temporary directory, listening only on loopback
(and a private Unix socket directory) on a free port. PostgreSQL refuses to run as root, so when the tests run
as root (CI, containers) every server command runs as the ``postgres`` user through ``runuser`` and the
directory is handed to that user. The binaries are taken from ``PATH`` or ``/usr/lib/postgresql/*/bin``
(Debian); when none is found the fixture fails: ``make system-deps`` installs them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg

__all__ = ["PostgresServer", "find_postgres_bin", "running_postgres"]


def find_postgres_bin() -> Path:
    """Return the directory holding ``initdb`` and ``pg_ctl``.

    Raises:
        RuntimeError: PostgreSQL server binaries are not installed.
    """
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found; run `make system-deps`")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One running PostgreSQL cluster; hands out fresh databases by URL."""

    def __init__(self, root: Path, bindir: Path, port: int, user: str | None) -> None:
        self.root = root
        self.bindir = bindir
        self.port = port
        self._user = user
        self._count = 0

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self._user, "--"] if self._user else []
        return [*prefix, *args]

    def _run(self, *args: str) -> None:
        done = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {done.stderr.strip()[-2000:]}")

    def start(self) -> None:
        """initdb (first time) and start the server; waits until it accepts connections."""
        if not self.data_dir.exists():
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60 -c shared_buffers=32MB"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self) -> None:
        """Stop the server at once (immediate mode: the throw-away data needs no shutdown checkpoint)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")

    @property
    def admin_url(self) -> str:
        """URL of the ``postgres`` maintenance database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """Create an empty database and return its URL."""
        self._count += 1
        name = f"fedfer_test_{os.getpid()}_{self._count}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a throw-away PostgreSQL server for the duration of the block, then stop and delete it."""
    bindir = find_postgres_bin()
    user: str | None = None
    base = Path(tempfile.gettempdir())
    if os.geteuid() == 0 and not base.stat().st_mode & 0o001:
        base = Path("/tmp")  # the postgres user must be able to reach the cluster directory
    root = Path(tempfile.mkdtemp(prefix="fedfer-pg-", dir=base))
    try:
        if os.geteuid() == 0:
            user = "postgres"
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        root.chmod(0o700)
        last: Exception | None = None
        for _ in range(3):
            server = PostgresServer(root, bindir, _free_port(), user)
            try:
                server.start()
            except RuntimeError as exc:  # most likely the free port was taken meanwhile
                last = exc
                continue
            try:
                yield server
            finally:
                server.stop()
            return
        raise RuntimeError(f"PostgreSQL did not start: {last}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
