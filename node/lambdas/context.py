"""The `context` argument of `lambda_handler(event, context)`."""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["LambdaContext"]


@dataclass(frozen=True)
class LambdaContext:
    """What a handler may know about its own call, so it can budget time and memory.

    `deadline` is a `time.monotonic()` value: the moment the call is killed.
    """

    function_name: str
    memory_limit_mb: int
    timeout_s: float
    request_id: str | None
    deadline: float

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the call is killed (0 once the deadline has passed)."""
        return max(0, int((self.deadline - time.monotonic()) * 1000))
