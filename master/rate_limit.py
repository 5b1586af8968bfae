"""Rate limits per task name: how many tasks of that name the master starts per second.

A token bucket: tokens come at the limit's rate and each start takes one. The bucket holds
at most a tenth of a second's worth (and at least one), so after a pause no burst beyond
that goes out: any one second sees at most 10% more starts than the limit. The clock is a
parameter; nothing here reads the time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from core.errors import ConfigError

__all__ = ["RateLimit", "TokenBucket", "parse_rate_limit", "BURST_SECONDS"]

BURST_SECONDS = 0.1  # a bucket holds this many seconds' worth of starts (at least one)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_SPEC = re.compile(r"^([^=\s]+)=(\d+(?:\.\d+)?)/([smh])$")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `per_second` starts of tasks named `name` each second."""

    name: str
    per_second: float

    def __str__(self) -> str:
        return f"{self.name}={self.per_second:g}/s"


def parse_rate_limit(text: str) -> RateLimit:
    """`NAME=100/s` (or /m, /h) as a RateLimit; ConfigError naming the mistake."""
    match = _SPEC.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"rate limit {text!r}: write NAME=COUNT/s, /m or /h (e.g. "
                          "primes=100/s)")
    name, count, unit = match.groups()
    rate = float(count) / _UNITS[unit]
    if not 0 < rate <= 1e6 or not math.isfinite(rate):
        raise ConfigError(f"rate limit {text!r}: the count must be above 0 and at most "
                          "1,000,000 per second")
    return RateLimit(name=name, per_second=rate)


class TokenBucket:
    """The starts a rate limit allows now; `now` is the caller's clock, in seconds."""

    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, per_second: float, *, now: float,
                 burst_seconds: float = BURST_SECONDS) -> None:
        self.rate = per_second
        self.capacity = max(1.0, per_second * burst_seconds)
        self.tokens = 1.0  # one start at once; more only as time passes
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)  # a clock that steps back adds nothing

    def available(self, now: float) -> int:
        """Whole starts allowed now."""
        self._refill(now)
        return int(self.tokens + 1e-9)

    def take(self, now: float) -> bool:
        """Take one start if allowed now."""
        self._refill(now)
        if self.tokens >= 1.0 - 1e-9:
            self.tokens -= 1.0
            return True
        return False

    def next_at(self, now: float) -> float:
        """When the next start is allowed (now, if one is)."""
        self._refill(now)
        missing = 1.0 - self.tokens
        return now if missing <= 1e-9 else now + missing / self.rate
