"""Built-in lambdas for demos and tests; the node registers them (`register_builtins`), importing
this module registers nothing.

Each exercises one thing a user relies on: a round trip (echo), the timeout (sleep), the memory
limit (allocate), error reporting (fail) and per-call environment variables (env). None of
them can read the node's own environment: a lambda runs with its call's variables over a fixed
base (`node.lambdas.environment`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from node.lambdas.context import LambdaContext
from node.lambdas.registry import LambdaRegistry, default_registry

__all__ = ["echo", "sleep", "allocate", "fail", "env", "BUILTIN_LAMBDAS", "register_builtins"]

_MIB = 1024 * 1024
_PAGE = 4096


def echo(event: Any, context: LambdaContext) -> Any:
    """Return the event unchanged."""
    return event


def sleep(event: dict[str, Any], context: LambdaContext) -> dict[str, float]:
    """Sleep event["seconds"], then report it: a stand-in for slow work."""
    seconds = float(event["seconds"])
    time.sleep(seconds)
    return {"slept_s": seconds}


def allocate(event: dict[str, Any], context: LambdaContext) -> dict[str, int]:
    """Allocate and touch event["mb"] MB: a stand-in for memory-hungry work."""
    mb = int(event["mb"])
    block = bytearray(mb * _MIB)
    for offset in range(0, len(block), _PAGE):
        block[offset] = 1  # touch every page so the memory is really in use
    return {"allocated_mb": mb}


def fail(event: dict[str, Any], context: LambdaContext) -> None:
    """Raise ValueError(event["message"]): shows how errors come back."""
    raise ValueError(event.get("message", "failed on purpose"))


def env(event: dict[str, Any], context: LambdaContext) -> str | None:
    """The value of the variable event["name"] in this call's environment: one the call gave
    (or the fixed base), never the node's (None if unset)."""
    return os.environ.get(event["name"])


BUILTIN_LAMBDAS = {"echo": echo, "sleep": sleep, "allocate": allocate, "fail": fail, "env": env}


def register_builtins(registry: LambdaRegistry = default_registry) -> LambdaRegistry:
    """Add the built-in lambdas to `registry` (a name taken by another function is an error,
    as for any lambda); a worker process finds them again by module and name."""
    for name, fn in BUILTIN_LAMBDAS.items():
        registry.add(fn, name=name)
    return registry
