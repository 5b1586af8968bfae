"""A rate over a sliding window: tasks ended per second over the last minute.

The master samples its running total of ended tasks now and then (`record`); the rate is
the growth across the samples of the window. Pure bookkeeping: the clock is a parameter.
"""

from __future__ import annotations

from collections import deque

__all__ = ["RateWindow"]


class RateWindow:
    """(time, total) samples of one counter; the window's oldest sample bounds the rate."""

    def __init__(self, *, window: float = 60.0, resolution: float = 1.0) -> None:
        self.window = window
        self.resolution = resolution  # samples closer than this to the last are not kept
        self._samples: deque[tuple[float, int]] = deque()

    def record(self, now: float, total: int) -> None:
        samples = self._samples
        if samples and total < samples[-1][1]:
            samples.clear()  # the counter went back (a restored master): start again
        if not samples or now - samples[-1][0] >= self.resolution:
            samples.append((now, total))
        while len(samples) > 1 and now - samples[1][0] >= self.window:
            samples.popleft()

    def rate(self, now: float, total: int) -> float:
        """Per second since the window's oldest sample (0 with no history yet)."""
        self.record(now, total)
        first_time, first_total = self._samples[0]
        span = now - first_time
        return (total - first_total) / span if span > 0 else 0.0
