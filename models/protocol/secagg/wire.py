"""The binary framing every secure-aggregation message shares, parsed with bounds.

A message is ``b"WSA" | version (u8) | kind (u8)`` followed by its fields: unsigned
big-endian integers, fixed-size byte strings, names (u8 length + an id as
:data:`~models.protocol.topics.NAME_PATTERN` allows) and counted lists. The size
bound is checked before a byte is read; every read checks what is left, a count
is bounded before a list is built, and trailing bytes are refused.
"""

from __future__ import annotations

import struct

from models.protocol.secagg.errors import SecAggError
from models.protocol.topics import NAME_PATTERN

__all__ = ["MAGIC", "MAX_MESSAGE_BYTES", "VERSION", "Reader", "Writer"]

MAGIC = b"WSA"
VERSION = 1
MAX_MESSAGE_BYTES = 8 * (1 << 24) + 4096
"""The largest message: a masked input of 2^24 values of 8 bytes, and its header."""


class Writer:
    """Appends fields to a message of one ``kind``."""

    def __init__(self, kind: int) -> None:
        self._buf = bytearray(MAGIC + bytes([VERSION, kind]))

    def u8(self, value: int) -> Writer:
        self._buf += struct.pack(">B", value)
        return self

    def u32(self, value: int) -> Writer:
        self._buf += struct.pack(">I", value)
        return self

    def fixed(self, data: bytes) -> Writer:
        self._buf += data
        return self

    def name(self, value: str) -> Writer:
        raw = value.encode()
        self._buf += struct.pack(">B", len(raw)) + raw
        return self

    def to_bytes(self) -> bytes:
        return bytes(self._buf)


class Reader:
    """Reads the fields of a message of ``kind`` (``what`` names it in errors)."""

    def __init__(self, data: bytes, kind: int, what: str, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise SecAggError("malformed", f"a {what} must be bytes, got {type(data).__name__}.")
        if len(data) > max_bytes:
            raise SecAggError("oversize", f"a {what} of {len(data)} bytes exceeds the {max_bytes}-byte bound.")
        self._data, self._pos, self.what = memoryview(data), 0, what
        if bytes(self.fixed(len(MAGIC))) != MAGIC or self.u8() != VERSION or self.u8() != kind:
            raise SecAggError("malformed", f"not a version-{VERSION} {what} (wrong magic, version or kind).")

    def fixed(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise SecAggError("malformed", f"the {self.what} is truncated.")
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out

    def u8(self) -> int:
        return int(self.fixed(1)[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.fixed(4))[0])

    def count(self, limit: int, min_item_bytes: int) -> int:
        """A list length, refused above ``limit`` or above what the bytes left could hold."""
        n = self.u32()
        if n > limit or n * min_item_bytes > len(self._data) - self._pos:
            raise SecAggError("malformed", f"the {self.what} lists {n} items, more than it can hold.")
        return n

    def name(self) -> str:
        raw = self.fixed(self.u8())
        try:
            value = raw.decode("ascii")
        except UnicodeDecodeError:
            value = ""
        if not NAME_PATTERN.fullmatch(value):
            raise SecAggError("malformed", f"the {self.what} holds an invalid id.")
        return value

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def end(self) -> None:
        if self._pos != len(self._data):
            raise SecAggError("malformed", f"the {self.what} has {len(self._data) - self._pos} trailing bytes.")
