"""Built-in lambdas for demos and tests, registered in the default registry on import.

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
from node.lambdas.registry import lambda_function

__all__ = ["echo", "sleep", "allocate", "fail", "env"]

_MIB = 1024 * 1024
_PAGE = 4096


@lambda_function("echo")
def echo(event: Any, context: LambdaContext) -> Any:
    """Return the event unchanged."""
    return event


@lambda_function("sleep")
def sleep(event: dict[str, Any], context: LambdaContext) -> dict[str, float]:
    """Sleep event["seconds"], then report it: a stand-in for slow work."""
    seconds = float(event["seconds"])
    time.sleep(seconds)
    return {"slept_s": seconds}


@lambda_function("allocate")
def allocate(event: dict[str, Any], context: LambdaContext) -> dict[str, int]:
    """Allocate and touch event["mb"] MB: a stand-in for memory-hungry work."""
    mb = int(event["mb"])
    block = bytearray(mb * _MIB)
    for offset in range(0, len(block), _PAGE):
        block[offset] = 1  # touch every page so the memory is really in use
    return {"allocated_mb": mb}


@lambda_function("fail")
def fail(event: dict[str, Any], context: LambdaContext) -> None:
    """Raise ValueError(event["message"]): shows how errors come back."""
    raise ValueError(event.get("message", "failed on purpose"))


@lambda_function("env")
def env(event: dict[str, Any], context: LambdaContext) -> str | None:
    """The value of the variable event["name"] in this call's environment: one the call gave
    (or the fixed base), never the node's (None if unset)."""
    return os.environ.get(event["name"])
