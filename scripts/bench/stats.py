"""Small statistics and reporting helpers shared by the benchmark scripts."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any, Sequence

__all__ = ["percentile", "latency_summary", "Progress", "machine", "stop_on_sigterm"]


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of `values` (fraction 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p99/mean/max in milliseconds, and the count."""
    if not seconds:
        return {"count": 0}
    return {"count": len(seconds),
            "p50_ms": round(percentile(seconds, 0.50) * 1e3, 3),
            "p99_ms": round(percentile(seconds, 0.99) * 1e3, 3),
            "mean_ms": round(sum(seconds) / len(seconds) * 1e3, 3),
            "max_ms": round(max(seconds) * 1e3, 3)}


class Progress:
    """One line per step on stderr, with the time the step took."""

    def __init__(self, prefix: str, *, quiet: bool = False) -> None:
        self.prefix = prefix
        self.quiet = quiet
        self.started = time.monotonic()

    def step(self, text: str) -> None:
        if not self.quiet:
            elapsed = time.monotonic() - self.started
            print(f"[{self.prefix} {elapsed:6.1f}s] {text}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the figures depend on: CPUs and how busy the machine already is."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {"cpus": os.cpu_count(), "load_average": load,
            "python": sys.version.split()[0], "platform": sys.platform}


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every started process is stopped by its handle."""
    def leave(_signum: int, _frame: object) -> None:
        raise SystemExit(143)
    signal.signal(signal.SIGTERM, leave)
