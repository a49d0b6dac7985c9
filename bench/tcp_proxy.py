"""A small asyncio TCP proxy on loopback that counts the bytes it forwards in each direction.

It sits below TLS, so what it counts is what the peers put on the wire above TCP: TLS records (handshake
included), HTTP/2 frames and gRPC messages; TCP/IP headers are not seen. The benchmark routes each device's
connection through its own proxy to measure upload bytes; tests use it as a network that can drop every
connection at once, or as an L4 balancer that picks the upstream per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

__all__ = ["TcpProxy", "Upstream"]

Upstream = tuple[str, int]
"""``(host, port)`` of the server a connection is forwarded to."""

_CHUNK = 1 << 16


class TcpProxy:
    """Forward every accepted connection to an upstream and count the bytes.

    Args:
        target: the upstream, or a callable that picks one for each new connection (returning None
            refuses the connection: it is closed at once, which a gRPC client sees as ``UNAVAILABLE``).
        host: the address to listen on.

    Attributes:
        bytes_up: bytes forwarded from clients to the upstream, over all connections.
        bytes_down: bytes forwarded from the upstream to clients.
        connections: connections accepted and forwarded.
        port: the bound port (after :meth:`start`).
    """

    def __init__(self, target: Upstream | Callable[[], Upstream | None], *, host: str = "127.0.0.1") -> None:
        self._target = target
        self._host = host
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.port = 0

    async def start(self) -> int:
        """Listen on a free port and return it."""
        self._server = await asyncio.start_server(self._handle, self._host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _upstream(self) -> Upstream | None:
        return self._target() if callable(self._target) else self._target

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = self._upstream()
        if upstream is None:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*upstream)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, up: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(_CHUNK):
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, up=True), pipe(up_reader, writer, up=False))
        except asyncio.CancelledError:
            # The loop is shutting down: end quietly (asyncio's server callback would report a cancelled
            # handler as an error). The connection is cut below.
            writer.transport.abort()
            up_writer.transport.abort()
        finally:
            self._writers -= {writer, up_writer}

    def drop_all(self) -> None:
        """Cut every live connection at once (a network drop); new connections are still accepted."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        """Stop listening and cut every live connection."""
        if self._server is not None:
            self._server.close()
        self.drop_all()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
