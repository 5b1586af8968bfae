"""What the master keeps, and for how long: finished tasks' records, nodes that are gone.

A master that runs for months must not grow with every task it ever ran or every node that
ever joined. Finished tasks (completed, failed or cancelled) are kept for a result TTL after
they end, then deleted from the journal; nodes dead or offline for longer than a set time are
forgotten and their retained status is cleared. The rules here are pure functions with the
clock as a parameter; the master's loop applies them.
"""

from __future__ import annotations

import math
from typing import Iterable

from core.errors import ConfigError

__all__ = ["DEFAULT_RESULT_TTL", "DEFAULT_FORGET_NODES_AFTER", "NEVER", "parse_duration",
           "format_duration", "expiry_cutoff", "sweep_interval", "gone_marks",
           "nodes_to_forget", "vacuum_pages"]

DEFAULT_RESULT_TTL = 24 * 3600.0        # a finished task's record and result, after it ends
DEFAULT_FORGET_NODES_AFTER = 3600.0     # a node dead or offline this long is forgotten
NEVER = 0.0                             # a TTL of 0: keep forever
_MAX_DURATION = 10 * 365 * 86400.0      # ten years: anything longer is a typo


def parse_duration(text: str, *, option: str) -> float:
    """Seconds in a duration such as `30s`, `5m`, `24h`, `2d12h` (the units of pipeline
    schedules) or a plain number of seconds (`0.5`); `0` or `never` is NEVER (keep forever).
    ConfigError naming `option` for anything else."""
    from pipelines.errors import ScheduleError
    from pipelines.timestrings import parse_time_string
    value = text.strip() if isinstance(text, str) else text
    if value in ("0", "never"):
        return NEVER
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{option} {text!r}: expected a duration such as 30s, 5m, 24h, "
                          "or 0/never")
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = float(parse_time_string(value))
        except ScheduleError as e:
            raise ConfigError(f"{option}: {e}; or 0/never to keep forever") from None
    if not math.isfinite(seconds) or seconds < 0 or seconds > _MAX_DURATION:
        raise ConfigError(f"{option} {text!r}: must be 0 (never) or a duration up to ten years")
    return seconds


def format_duration(seconds: float) -> str:
    """`seconds` the way people write it: `never` for 0, else `1d2h`, `5m`, `30s`, `0.5s`."""
    if seconds <= 0:
        return "never"
    if seconds < 60 and seconds != int(seconds):
        return f"{seconds:g}s"
    rest = int(round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or "0s"


def expiry_cutoff(now: float, ttl: float) -> float | None:
    """Tasks that ended before this (wall-clock) time have expired; None if nothing expires."""
    if ttl <= 0:
        return None
    return now - ttl


def sweep_interval(ttl: float) -> float:
    """How often to look for expired tasks: a tenth of the TTL, between 0.05 s and 1 s (a
    sweep that finds nothing costs one index probe)."""
    return min(1.0, max(0.05, ttl / 10.0))


def gone_marks(marks: dict[str, float], nodes: Iterable[tuple[str, bool]],
               now: float) -> dict[str, float]:
    """Since when each node has been gone: `marks` (node id -> time first seen gone) brought
    up to date with `nodes` ((node id, alive) pairs) at `now`. A live node has no mark, a
    node that left the registry neither."""
    out: dict[str, float] = {}
    for node_id, alive in nodes:
        if not alive:
            out[node_id] = marks.get(node_id, now)
    return out


def nodes_to_forget(marks: dict[str, float], now: float, after: float) -> list[str]:
    """Nodes gone for at least `after` seconds at `now` (none if `after` is 0: never)."""
    if after <= 0:
        return []
    return sorted(node_id for node_id, since in marks.items() if now - since >= after)


def vacuum_pages(free: int, total: int, *, step: int = 512, slack: float = 0.5,
                 floor: int = 256) -> int:
    """Free pages to hand back to the file system now: none while they are at most `slack` of
    the file (new rows reuse them: a live set that swings with the load keeps its pages),
    else at most `step` (a bounded pause per turn)."""
    if free <= floor or free <= slack * total:
        return 0
    return min(step, free - floor)
