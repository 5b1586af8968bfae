"""Human time strings such as "2w3d5h20m30s", turned into seconds for schedules and timeouts.

Units, largest first, case-sensitive (``M`` is a month, ``m`` a minute):

    q  quarter = 3 months = 90 days
    M  month   = 30 days (a fixed length, so an interval never depends on the calendar)
    w  week    = 7 days
    d  day     = 24 hours
    h  hour, m minute, s second

A string is one or more ``<number><unit>`` parts, units from largest to smallest, each at most
once, no spaces, total above zero. Anything else is refused rather than guessed at.
"""

from __future__ import annotations

from pipelines.errors import ScheduleError

__all__ = ["parse_time_string", "UNITS", "MINUTE", "HOUR", "DAY", "WEEK", "MONTH", "QUARTER"]

MINUTE = 60
HOUR = 60 * MINUTE
DAY = 24 * HOUR
WEEK = 7 * DAY
MONTH = 30 * DAY
QUARTER = 3 * MONTH

UNITS: dict[str, int] = {
    "q": QUARTER, "M": MONTH, "w": WEEK, "d": DAY, "h": HOUR, "m": MINUTE, "s": 1,
}
_RANK = {unit: rank for rank, unit in enumerate(UNITS)}
_DIGITS = frozenset("0123456789")
_MAX_DIGITS = 15
_UNIT_LIST = "q M w d h m s"


def parse_time_string(time_str: str) -> int:
    """Seconds in `time_str`; raises `ScheduleError` naming the part that is wrong."""
    if not isinstance(time_str, str):
        raise ScheduleError(f"a time string must be a str, got {type(time_str).__name__} "
                            f"{time_str!r}")
    if not time_str:
        raise ScheduleError("empty time string: expected something like '5m' or '2w3d'")
    total = 0
    previous: str | None = None
    pos = 0
    while pos < len(time_str):
        start = pos
        while pos < len(time_str) and time_str[pos] in _DIGITS:
            pos += 1
        number = time_str[start:pos]
        if pos == len(time_str):
            raise ScheduleError(f"time string {time_str!r}: the number {number!r} at the end "
                                f"has no unit (one of {_UNIT_LIST})")
        unit = time_str[pos]
        if unit not in UNITS:
            raise ScheduleError(f"time string {time_str!r}: unknown unit {unit!r} at position "
                                f"{pos} (units: {_UNIT_LIST})")
        if not number:
            raise ScheduleError(f"time string {time_str!r}: unit {unit!r} at position {pos} "
                                f"has no number before it")
        if len(number) > _MAX_DIGITS:
            raise ScheduleError(f"time string {time_str!r}: the number {number!r} is too large")
        if previous is not None:
            if unit == previous or _RANK[unit] < _RANK[previous]:
                what = "repeats" if unit == previous else "comes after"
                raise ScheduleError(
                    f"time string {time_str!r}: unit {unit!r} {what} {previous!r}; write each "
                    f"unit once, from largest to smallest ({_UNIT_LIST})")
        total += int(number) * UNITS[unit]
        previous = unit
        pos += 1
    if total == 0:
        raise ScheduleError(f"time string {time_str!r} adds up to zero seconds; an interval "
                            f"must be at least 1s")
    return total
