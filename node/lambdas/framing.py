"""Length-prefixed msgpack frames on the local pipes between a node, its zygote and the
zygote's children. The same codec as the wire, so a value that crosses here can cross the
network too; nothing is pickled.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from node.lambdas.errors import FrameError

__all__ = ["FrameError", "pack", "unpack", "frame", "FrameBuffer", "HEADER_SIZE"]

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
MAX_FRAME_BYTES = 2**32 - 1


def pack(obj: Any) -> bytes:
    """msgpack bytes of `obj`, refusing what the wire could not carry back (sets, objects,
    non-string map keys, integers past 64 bits)."""
    try:
        data = msgpack.packb(obj, use_bin_type=True)
        msgpack.unpackb(data, raw=False, strict_map_key=True)  # same rules as the wire decoder
    except (TypeError, ValueError, OverflowError) as e:
        raise FrameError(str(e) or type(e).__name__) from e
    return data


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # every parser failure means the same: the bytes are not a frame
        raise FrameError(f"malformed frame: {e}") from e


def frame(payload: bytes) -> bytes:
    """Prefix already packed bytes with their length."""
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(payload)} bytes is larger than {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(payload)) + payload


class FrameBuffer:
    """Collects bytes as they arrive and hands out each complete frame's payload."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        self._data += chunk
        out: list[bytes] = []
        while len(self._data) >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(self._data)
            end = HEADER_SIZE + size
            if len(self._data) < end:
                break
            out.append(bytes(self._data[HEADER_SIZE:end]))
            del self._data[:end]
        return out

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame (nonzero at EOF = truncated)."""
        return len(self._data)
