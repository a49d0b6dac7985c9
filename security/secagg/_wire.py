"""Canonical binary encoding shared by every secure-aggregation message (private).

Layout: ``b"FSA" || version (u8) || kind (u8) || fields``. Integers are fixed-width little-endian; byte
strings and sequences carry a u32 length prefix. A reader must consume the input exactly; any deviation raises
:class:`MalformedMessageError`, so each message has exactly one encoding.
"""

from __future__ import annotations

import struct
from typing import Any

from fedfer.security.errors import ProtocolError, ValidationError

MAGIC = b"FSA"
WIRE_VERSION = 3
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
MAX_ITEMS = 1 << 24


class MalformedMessageError(ProtocolError, ValidationError):
    """A message has wrong field types, values out of range, or an encoding that does not parse exactly."""


class Writer:
    """Append-only builder of one encoded message."""

    __slots__ = ("_parts",)

    def __init__(self, kind: int) -> None:
        self._parts: list[bytes] = [MAGIC, _U8.pack(WIRE_VERSION), _U8.pack(kind)]

    def u8(self, value: int) -> None:
        """Append one unsigned byte."""
        self._parts.append(_U8.pack(value))

    def u32(self, value: int) -> None:
        """Append an unsigned 32-bit integer."""
        self._parts.append(_U32.pack(value))

    def u64(self, value: int) -> None:
        """Append an unsigned 64-bit integer."""
        self._parts.append(_U64.pack(value))

    def f64(self, value: float) -> None:
        """Append an IEEE-754 double."""
        self._parts.append(_F64.pack(value))

    def raw(self, value: bytes) -> None:
        """Append bytes of a length fixed by the format (no prefix)."""
        self._parts.append(value)

    def blob(self, value: bytes) -> None:
        """Append a u32 length prefix and the bytes."""
        self._parts.append(_U32.pack(len(value)))
        self._parts.append(value)

    def records(self, fmt: struct.Struct, items: list[tuple[object, ...]]) -> None:
        """Append a u32 count and ``items`` packed back to back with the fixed-size record format ``fmt``."""
        self._parts.append(_U32.pack(len(items)))
        self._parts.append(b"".join(fmt.pack(*item) for item in items))

    def finish(self) -> bytes:
        """Return the encoded message."""
        return b"".join(self._parts)


class Reader:
    """Strict cursor over one encoded message."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes, kind: int) -> None:
        if type(data) is not bytes:
            raise MalformedMessageError("message must be bytes")
        if len(data) < 5 or data[:3] != MAGIC:
            raise MalformedMessageError("not a secure-aggregation message")
        if data[3] != WIRE_VERSION:
            raise MalformedMessageError("unsupported secure-aggregation wire version")
        if data[4] != kind:
            raise MalformedMessageError("unexpected message kind")
        self._data = data
        self._pos = 5

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise MalformedMessageError("truncated message")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def u8(self) -> int:
        """Read one unsigned byte."""
        return int(_U8.unpack(self._take(1))[0])

    def u32(self) -> int:
        """Read an unsigned 32-bit integer."""
        return int(_U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        """Read an unsigned 64-bit integer."""
        return int(_U64.unpack(self._take(8))[0])

    def f64(self) -> float:
        """Read an IEEE-754 double."""
        return float(_F64.unpack(self._take(8))[0])

    def raw(self, n: int) -> bytes:
        """Read exactly ``n`` bytes."""
        return self._take(n)

    def blob(self) -> bytes:
        """Read a u32-length-prefixed byte string."""
        return self._take(self.u32())

    def count(self) -> int:
        """Read a sequence length (bounded)."""
        n = self.u32()
        if n > MAX_ITEMS:
            raise MalformedMessageError("sequence too long")
        return n

    def records(self, fmt: struct.Struct) -> list[tuple[Any, ...]]:
        """Read a u32 count and that many fixed-size records of format ``fmt``."""
        n = self.count()
        return list(fmt.iter_unpack(self._take(n * fmt.size)))

    def end(self) -> None:
        """Require that the whole input was consumed."""
        if self._pos != len(self._data):
            raise MalformedMessageError("trailing bytes after message")


def peek_kind(data: bytes) -> int:
    """Return the kind byte of an encoded message after checking magic and version."""
    if type(data) is not bytes or len(data) < 5 or data[:3] != MAGIC:
        raise MalformedMessageError("not a secure-aggregation message")
    if data[3] != WIRE_VERSION:
        raise MalformedMessageError("unsupported secure-aggregation wire version")
    return data[4]
