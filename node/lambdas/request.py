"""One validated call: every value that reaches a worker process has been checked here first.

A request comes from the wire, so its types are not trusted: a timeout that is not a positive
number, an absurd memory size or an environment that is not str -> str is refused with a
message, as a "bad_request" result, before anything is started.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from node.lambdas.errors import BadRequest, LambdaError

__all__ = ["BadRequest", "LambdaLimits", "LambdaCall", "validate_call", "call_from_lambda_data"]


@dataclass(frozen=True)
class LambdaLimits:
    """Defaults for calls that name no limit, and the bounds any call must stay within."""

    default_timeout_s: float = 30.0
    default_memory_mb: int = 256
    max_timeout_s: float = 86_400.0
    max_memory_mb: int = 1_048_576

    def __post_init__(self) -> None:
        if not (_is_number(self.max_timeout_s) and 0 < self.max_timeout_s < math.inf):
            raise LambdaError(f"max_timeout_s must be a positive number, got {self.max_timeout_s!r}")
        if not (_is_int(self.max_memory_mb) and self.max_memory_mb >= 1):
            raise LambdaError(f"max_memory_mb must be a positive integer, got {self.max_memory_mb!r}")
        try:
            _timeout(self.default_timeout_s, self)
            _memory(self.default_memory_mb, self)
        except BadRequest as e:
            raise LambdaError(f"invalid default: {e}") from None


@dataclass(frozen=True)
class LambdaCall:
    """A call ready to run: name, payload, environment and the limits it runs under."""

    name: str
    event: Any
    env: Mapping[str, str]
    timeout_s: float
    memory_mb: int
    request_id: str | None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _timeout(value: object, limits: LambdaLimits) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"timeout must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not (0 < seconds <= limits.max_timeout_s):
        raise BadRequest(f"timeout must be above 0 and at most {limits.max_timeout_s:g} s, got {value!r}")
    return seconds


def _memory(value: object, limits: LambdaLimits) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"memory must be a whole number of MB, got {type(value).__name__}")
    if not (1 <= value <= limits.max_memory_mb):
        raise BadRequest(f"memory must be between 1 and {limits.max_memory_mb} MB, got {value!r}")
    return value


def _env(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadRequest(f"env must be a map of strings to strings, got {type(value).__name__}")
    env: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise BadRequest(f"env must map strings to strings, got {key!r}: {val!r}")
        if not key or "=" in key or "\0" in key or "\0" in val:
            raise BadRequest(f"invalid environment variable {key!r}: no '=' or NUL, and not empty")
        env[key] = val
    return env


def validate_call(
    name: object,
    event: Any,
    *,
    env: object,
    timeout_s: object,
    memory_mb: object,
    request_id: object,
    limits: LambdaLimits,
) -> LambdaCall:
    """Check every parameter of one call; raises BadRequest naming the first bad one."""
    if not isinstance(name, str) or not name:
        raise BadRequest(f"name must be a non-empty string, got {name!r}")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"request_id must be a string, got {type(request_id).__name__}")
    return LambdaCall(
        name=name,
        event=event,
        env=_env(env),
        timeout_s=limits.default_timeout_s if timeout_s is None else _timeout(timeout_s, limits),
        memory_mb=limits.default_memory_mb if memory_mb is None else _memory(memory_mb, limits),
        request_id=request_id,
    )


def call_from_lambda_data(lambda_data: object, *, limits: LambdaLimits) -> LambdaCall:
    """Validate the dispatch shape `{"name", "event", "env", "timeout", "memory"}` (plus an
    optional "request_id"); other keys are ignored so the message can grow."""
    if not isinstance(lambda_data, Mapping):
        raise BadRequest(f"lambda data must be a map, got {type(lambda_data).__name__}")
    return validate_call(
        lambda_data.get("name"),
        lambda_data.get("event"),
        env=lambda_data.get("env"),
        timeout_s=lambda_data.get("timeout"),
        memory_mb=lambda_data.get("memory"),
        request_id=lambda_data.get("request_id"),
        limits=limits,
    )
