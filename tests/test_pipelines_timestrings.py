"""Time strings ("2w3d5h20m30s") and interval arithmetic, which schedules and timeouts rely on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import FabricError
from pipelines import PipelineError, ScheduleError, next_run, parse_time_string
from pipelines.timestrings import DAY, HOUR, MINUTE, MONTH, QUARTER, UNITS, WEEK


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30),
    ("5m", 300),
    ("2h", 7200),
    ("1d", 86400),
    ("1w", 7 * 86400),
    ("1M", 30 * 86400),
    ("1q", 90 * 86400),
    ("2w3d5h20m30s", 2 * WEEK + 3 * DAY + 5 * HOUR + 20 * MINUTE + 30),
    ("1q1M1w1d1h1m1s", QUARTER + MONTH + WEEK + DAY + HOUR + MINUTE + 1),
    ("90s", 90),
    ("007m", 420),
    ("0h5m", 300),
])
def test_parses_units_and_combinations(text: str, seconds: int) -> None:
    assert parse_time_string(text) == seconds


def test_month_and_minute_are_told_apart_by_case() -> None:
    assert parse_time_string("1M") == 30 * 24 * 3600
    assert parse_time_string("1m") == 60


def test_a_quarter_is_three_months_of_thirty_days() -> None:
    assert QUARTER == 3 * MONTH == 90 * DAY


@pytest.mark.parametrize("text, named", [
    ("", "empty"),
    ("5", "'5' at the end has no unit"),
    ("5x", "unknown unit 'x'"),
    ("5D", "unknown unit 'D'"),
    ("m", "unit 'm' at position 0 has no number"),
    ("5hm", "unit 'm' at position 2 has no number"),
    ("5m5m", "unit 'm' repeats 'm'"),
    ("30s5m", "unit 'm' comes after 's'"),
    ("1h2d", "unit 'd' comes after 'h'"),
    ("0s", "zero"),
    ("0d0h", "zero"),
    ("5 m", "unknown unit ' '"),
    (" 5m", "unknown unit ' '"),
    ("-5m", "unknown unit '-'"),
    ("1.5h", "unknown unit '.'"),
    ("5m\n", "unknown unit '\\n'"),
    ("1" * 40 + "s", "too large"),
])
def test_rejects_bad_strings_naming_the_bad_part(text: str, named: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_time_string(text)
    assert named in str(caught.value)


@pytest.mark.parametrize("value", [None, 5, 5.0, b"5m", ["5m"]])
def test_rejects_non_strings(value: object) -> None:
    with pytest.raises(ScheduleError, match="must be a str"):
        parse_time_string(value)  # type: ignore[arg-type]


def test_schedule_errors_belong_to_the_fabric_tree() -> None:
    assert issubclass(ScheduleError, PipelineError)
    assert issubclass(PipelineError, FabricError)


@given(st.lists(st.integers(min_value=0, max_value=10_000), min_size=len(UNITS),
                max_size=len(UNITS)),
       st.lists(st.booleans(), min_size=len(UNITS), max_size=len(UNITS)))
def test_any_ordered_combination_adds_up(numbers: list[int], keep: list[bool]) -> None:
    parts = [(n, unit) for n, unit, k in zip(numbers, UNITS, keep) if k]
    expected = sum(n * UNITS[unit] for n, unit in parts)
    text = "".join(f"{n}{unit}" for n, unit in parts)
    if expected == 0:
        with pytest.raises(ScheduleError):
            parse_time_string(text)
    else:
        assert parse_time_string(text) == expected


# -- next_run -------------------------------------------------------------------------------

def test_next_run_is_one_interval_after_the_previous_fire() -> None:
    assert next_run(1000.0, 300.0) == 1300.0
    assert next_run(1000.0, 300.0, now=1200.0) == 1300.0


def test_next_run_skips_missed_fires_and_keeps_the_grid() -> None:
    # Down from 1000 to 2150: the fires at 1300..2100 are gone; the next one is on the grid.
    assert next_run(1000.0, 300.0, now=2150.0) == 2200.0
    # A tick exactly on a grid time counts that time as done.
    assert next_run(1000.0, 300.0, now=2200.0) == 2500.0


@given(st.floats(min_value=0, max_value=1e9), st.floats(min_value=0.001, max_value=1e7),
       st.floats(min_value=0, max_value=1e9))
def test_next_run_is_always_later_than_now(previous: float, interval: float,
                                           elapsed: float) -> None:
    now = previous + elapsed
    following = next_run(previous, interval, now=now)
    assert following > now
    assert following - interval <= now + 1e-6 * max(1.0, abs(now))


@pytest.mark.parametrize("interval", [0, -5, float("nan"), float("inf")])
def test_next_run_rejects_non_positive_intervals(interval: float) -> None:
    with pytest.raises(ScheduleError):
        next_run(0.0, interval)
