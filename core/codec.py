"""Payload codecs: msgpack for CPython peers, JSON for MicroPython and people.

A decoder accepts both and tells them apart by the first byte: a JSON message is an object
(`{`), a msgpack message is a map (0x80-0x8f, 0xde, 0xdf). Nothing is ever unpickled or
evaluated from the wire.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import msgpack

from core.errors import DecodeError, EncodeError

__all__ = ["JSON", "MSGPACK", "CODECS", "MAX_PACKET", "PAYLOAD_LIMIT", "encode", "decode", "detect_codec",
           "encode_within"]

JSON = "json"
MSGPACK = "msgpack"
CODECS = (MSGPACK, JSON)

_JSON_START = frozenset(b"{ \t\r\n")

# The largest MQTT packet a broker takes by default here (broker.conf's max_packet_size); a
# broker disconnects a client that sends more, so nothing larger may leave.
MAX_PACKET = 1_048_576
PAYLOAD_LIMIT = MAX_PACKET - 1024  # room for the fixed header, topic and packet id


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
    """Serialise a message dict; raises EncodeError for values the codec cannot carry.

    msgpack holds integers of 64 bits at most; a message with a larger one (a prime above
    2^64, a count from a JSON peer) goes out as JSON instead, which every decoder reads.
    """
    try:
        if codec == MSGPACK:
            try:
                return msgpack.packb(obj, use_bin_type=True)
            except OverflowError:
                codec = JSON
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


def encode_within(items: list, make_payload: Callable[[list], bytes], *,
                  limit: int = PAYLOAD_LIMIT) -> list[tuple[list, bytes]]:
    """Encode `items` as few payloads as fit under `limit`, halving a batch that does not.

    Returns (items, payload) pairs; a single item too large on its own comes back as is (its
    payload over the limit), for the caller to replace with an error.
    """
    payload = make_payload(items)
    if len(payload) <= limit or len(items) <= 1:
        return [(items, payload)]
    half = len(items) // 2
    return (encode_within(items[:half], make_payload, limit=limit)
            + encode_within(items[half:], make_payload, limit=limit))
