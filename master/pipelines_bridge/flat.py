"""Flat JSON for what a person inspects in MQTT Explorer: one level, dot-free keys, numbers.

Explorer draws a JSON payload's keys as a table and charts numeric values, but a key holding a
dot, or a nested object, reads badly (and cannot be charted). Pipeline events carry arbitrary
task results, so they are flattened here: nested tables become `parent_child` keys (a few
levels deep), arrays become a short text plus a `<key>_count`, and long text is cut, so one huge
result cannot make a huge event.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["flat_json", "flat_json_bytes"]

_UNSAFE_KEY = re.compile(r"[.\s/+#]+")
_MAX_EXACT_INT = 2 ** 53  # beyond this a JavaScript number (Explorer's charts) loses digits


def flat_json(data: Mapping[str, Any], *, max_keys: int = 64, max_text: int = 300,
              max_depth: int = 3) -> dict[str, Any]:
    """`data` as a one-level dict of JSON scalars; see the module docstring for the rules."""
    flat = _Flattener(max_keys=max_keys, max_text=max_text, max_depth=max_depth)
    for key, value in data.items():
        flat.put(_key(key), value, 0)
    if flat.dropped:
        flat.out["keys_dropped"] = flat.dropped
    return flat.out


def flat_json_bytes(data: Mapping[str, Any], **limits: int) -> bytes:
    """`flat_json(data)` encoded as compact UTF-8 JSON, ready to publish."""
    return json.dumps(flat_json(data, **limits), separators=(",", ":"),
                      allow_nan=False).encode()


class _Flattener:
    def __init__(self, *, max_keys: int, max_text: int, max_depth: int) -> None:
        self.out: dict[str, Any] = {}
        self.dropped = 0
        self.max_keys = max_keys
        self.max_text = max_text
        self.max_depth = max_depth

    def put(self, key: str, value: Any, depth: int) -> None:
        if isinstance(value, Mapping):
            if value and depth < self.max_depth:
                for child, item in value.items():
                    self.put(f"{key}_{_key(child)}", item, depth + 1)
                return
            self.set(key, self.text(_compact(value)))
            return
        if isinstance(value, (list, tuple, set, frozenset)):
            items = list(value)
            self.set(f"{key}_count", len(items))
            if all(_is_scalar(item) for item in items):
                self.set(key, self.text(", ".join("null" if i is None else str(i)
                                                  for i in items)))
            else:
                self.set(key, self.text(_compact(items)))
            return
        self.set(key, self.scalar(value))

    def set(self, key: str, value: Any) -> None:
        candidate, n = key, 1
        while candidate in self.out:  # two source keys flattened to one name: keep both
            n += 1
            candidate = f"{key}_{n}"
        if len(self.out) >= self.max_keys:
            self.dropped += 1
            return
        self.out[candidate] = value

    def scalar(self, value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value if abs(value) <= _MAX_EXACT_INT else str(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return f"<{len(value)} bytes>"
        return self.text(repr(value))

    def text(self, value: str) -> str:
        if len(value) <= self.max_text:
            return value
        return value[:max(0, self.max_text - 3)] + "..."


def _key(key: Any) -> str:
    return _UNSAFE_KEY.sub("_", str(key)) or "_"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _compact(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        return repr(value)
