"""Interval arithmetic for schedules, as pure functions of the times they are given."""

from __future__ import annotations

import math

from pipelines.errors import ScheduleError

__all__ = ["next_run"]


def next_run(previous: float, interval: float, *, now: float | None = None) -> float:
    """The fire time after `previous` on its grid of `interval` seconds.

    With `now`, the first grid time later than `now`: fires missed while the process was down
    or busy coalesce into the one that just happened instead of replaying as a burst, and the
    grid does not drift with how late a tick was.
    """
    if not interval > 0 or math.isinf(interval):
        raise ScheduleError(f"an interval must be a positive number of seconds, got {interval!r}")
    following = previous + interval
    if following <= previous:
        raise ScheduleError(f"an interval of {interval!r}s is too small to add to {previous!r}")
    if now is not None and following <= now:
        following = previous + (math.floor((now - previous) / interval) + 1) * interval
        while following <= now:  # floating-point rounding at the boundary
            following += interval
    return following
