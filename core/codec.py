"""Payload codecs: msgpack for CPython peers, JSON for MicroPython and people.

A decoder accepts both and tells them apart by the first byte: a JSON message is an object
(`{`), a msgpack message is a map (0x80-0x8f, 0xde, 0xdf). Nothing is ever unpickled or
evaluated from the wire.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

from core.errors import DecodeError, EncodeError

__all__ = ["JSON", "MSGPACK", "CODECS", "encode", "decode", "detect_codec"]

JSON = "json"
MSGPACK = "msgpack"
CODECS = (MSGPACK, JSON)

_JSON_START = frozenset(b"{ \t\r\n")


def detect_codec(payload: bytes) -> str:
    """Which codec wrote `payload`; raises DecodeError for anything else."""
    if not payload:
        raise DecodeError("empty payload")
    first = payload[0]
    if first in _JSON_START:
        return JSON
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        return MSGPACK
    raise DecodeError(f"payload is neither a JSON object nor a msgpack map (first byte 0x{first:02x})")


def encode(obj: dict[str, Any], codec: str = MSGPACK) -> bytes:
    """Serialise a message dict; raises EncodeError for values the codec cannot carry."""
    try:
        if codec == MSGPACK:
            return msgpack.packb(obj, use_bin_type=True)
        if codec == JSON:
            return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError, OverflowError) as e:
        raise EncodeError(f"cannot encode message as {codec}: {e}") from e
    raise EncodeError(f"unknown codec {codec!r}")


def decode(payload: bytes) -> dict[str, Any]:
    """Parse a payload of either codec into a dict; any failure is a DecodeError."""
    codec = detect_codec(payload)
    try:
        if codec == JSON:
            obj = json.loads(payload)
        else:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # every parser failure means the same thing to the caller
        raise DecodeError(f"malformed {codec} payload: {e}") from e
    if not isinstance(obj, dict):
        raise DecodeError(f"message must be a map, got {type(obj).__name__}")
    return obj
