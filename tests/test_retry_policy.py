"""Retry policy, delayed starts and rate limits: the pure rules over a fake clock (backoff,
token bucket, the scheduler's waiting heap), the journal that keeps them across a restart,
and the wire fields old senders leave out."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from core.errors import ConfigError, DecodeError
from core.protocol import NodeStatus, TaskResult, TaskSpec, make_task
from master.journal import Journal
from master.rate_limit import RateLimit, TokenBucket, parse_rate_limit
from master.retry_policy import RetryPolicy, backoff_delay, parse_retry_on
from master.scheduler import FAILED, PERMANENT_ERRORS, QUEUED, Scheduler, TaskRecord


# -- backoff ------------------------------------------------------------------------------------

def test_backoff_doubles_up_to_its_cap_and_jitter_only_shortens_it() -> None:
    full = [backoff_delay(n, base=0.5, cap=10.0, jitter=0.25, rand=0.0) for n in range(1, 8)]
    assert full == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff_delay(3, base=0.5, cap=10.0, jitter=0.25, rand=0.999) == pytest.approx(1.5, 0.01)
    assert backoff_delay(1, base=0.0, cap=10.0, jitter=0.25, rand=0.5) == 0.0  # at once
    assert backoff_delay(999, base=1.0, cap=60.0, jitter=0.0, rand=0.0) == 60.0  # no overflow


def test_with_any_jitter_drawn_each_wait_is_longer_than_the_last_until_the_cap() -> None:
    policy = RetryPolicy(backoff=0.1, backoff_max=100.0)
    for draws in ([0.0] * 6, [0.999] * 6, [0.999, 0.0, 0.999, 0.0, 0.999, 0.0],
                  [0.0, 0.999, 0.0, 0.999, 0.0, 0.999]):
        waits = [policy.delay(n, r) for n, r in enumerate(draws, 1)]
        assert all(b > a for a, b in zip(waits, waits[1:])), waits


def test_retry_on_names_kinds_and_error_stands_for_every_curable_one() -> None:
    default = RetryPolicy()
    assert default.retries("exception", PERMANENT_ERRORS)
    assert not default.retries("timeout", PERMANENT_ERRORS)
    assert not default.retries("bad_request", PERMANENT_ERRORS)
    both = RetryPolicy(retry_on=frozenset({"error", "timeout"}))
    assert both.retries("exception", PERMANENT_ERRORS) and both.retries("timeout", PERMANENT_ERRORS)
    assert not both.retries("bad_request", PERMANENT_ERRORS)
    only = RetryPolicy(retry_on=frozenset({"timeout"}))
    assert only.retries("timeout", PERMANENT_ERRORS)
    assert not only.retries("exception", PERMANENT_ERRORS)
    assert not RetryPolicy(retry_on=frozenset()).retries("exception", PERMANENT_ERRORS)


def test_a_task_policy_overrides_the_masters_default_field_by_field() -> None:
    master = RetryPolicy(backoff=1.0, backoff_max=30.0)
    own = master.for_task(make_task("x", backoff=0.2, retry_on=("timeout",)))
    assert (own.backoff, own.backoff_max, own.retry_on) == (0.2, 30.0, frozenset({"timeout"}))
    plain = make_task("x")
    assert master.for_task(plain) is master


def test_bad_policies_and_kinds_are_refused_with_a_clear_error() -> None:
    assert parse_retry_on("exception, timeout") == ("exception", "timeout")
    assert parse_retry_on("none") == ()
    for bad in ("", "Timeout", "a b", ",,"):
        with pytest.raises(ConfigError, match="retry-on"):
            parse_retry_on(bad)
    with pytest.raises(ConfigError, match="backoff"):
        RetryPolicy(backoff=-1.0)
    with pytest.raises(ConfigError, match="backoff"):
        make_task("x", backoff=float("nan"))
    with pytest.raises(ConfigError, match="not_before"):
        make_task("x", not_before=-5)


# -- token bucket ---------------------------------------------------------------------------------

def test_rate_limits_parse_per_second_minute_and_hour() -> None:
    assert parse_rate_limit("primes=100/s") == RateLimit("primes", 100.0)
    assert parse_rate_limit("echo=120/m").per_second == pytest.approx(2.0)
    assert parse_rate_limit("sleep=36/h").per_second == pytest.approx(0.01)
    for bad in ("primes", "primes=100", "primes=fast/s", "=5/s", "primes=5/d", "primes=0/s",
                "primes=-1/s"):
        with pytest.raises(ConfigError, match="rate limit"):
            parse_rate_limit(bad)


def test_a_bucket_allows_its_rate_in_any_second_within_ten_percent() -> None:
    for rate in (20.0, 100.0, 3.0):
        bucket = TokenBucket(rate, now=0.0)
        starts = []
        t = 0.0
        while t < 20.0:  # a dispatcher asking every millisecond, greedily
            while bucket.take(t):
                starts.append(t)
            t = round(t + 0.001, 6)
        assert len(starts) == pytest.approx(20 * rate, rel=0.1)
        for begin in [s for s in starts]:
            in_window = sum(1 for s in starts if begin <= s < begin + 1.0)
            assert in_window <= 1.1 * rate + 1, (rate, begin, in_window)


def test_after_a_pause_a_bucket_holds_only_a_tenth_of_a_second_and_says_when_next() -> None:
    bucket = TokenBucket(100.0, now=0.0)
    assert bucket.available(60.0) == 10
    assert sum(bucket.take(60.0) for _ in range(50)) == 10
    assert bucket.next_at(60.0) == pytest.approx(60.01)
    assert not bucket.take(59.0)  # a clock that steps back adds nothing


# -- the scheduler ------------------------------------------------------------------------------

def _scheduler(**kw) -> Scheduler:
    s = Scheduler(rand=lambda: 0.0, **kw)
    s.node_status(NodeStatus(node_id="n1", status="ready", capacity=100, prefetch=0), 0.0)
    return s


def _fail(s: Scheduler, record: TaskRecord, now: float, kind: str = "exception") -> str:
    verdict, _ = s.result("n1", TaskResult(id=record.id, ok=False, error={"kind": kind},
                                           attempt=record.dispatch, token=record.token), now=now)
    return verdict


def _assigned(s: Scheduler, now: float) -> list[str]:
    return [r.id for batch in s.assign(now=now).values() for r in batch]


def test_a_failed_run_waits_its_backoff_and_the_gaps_grow() -> None:
    s = _scheduler(max_attempts=5, retry=RetryPolicy(backoff=1.0, backoff_max=3.0))
    record = s.submit(make_task("x"))
    starts = []
    now = 0.0
    assert _assigned(s, now) == [record.id]
    starts.append(now)
    for _ in range(4):
        assert _fail(s, record, now) in ("retry", "failed")
        if record.state == FAILED:
            break
        while not _assigned(s, now):
            assert record.state == QUEUED and s.queued == 1
            now = round(now + 0.05, 6)
        starts.append(now)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps == pytest.approx([1.0, 2.0, 3.0, 3.0], abs=0.051)  # doubled, then capped
    assert _fail(s, record, now) == "failed"


def _fail_with(s: Scheduler, record: TaskRecord, hint: object, kind: str = "exception") -> str:
    verdict, _ = s.result("n1", TaskResult(id=record.id, ok=False,
                                           error={"kind": kind, "retry": hint},
                                           attempt=record.dispatch, token=record.token), now=0.0)
    return verdict


def test_the_policy_a_task_was_registered_with_applies_unless_the_submission_says() -> None:
    s = _scheduler(max_attempts=2)
    registered = {"max_attempts": 4, "retry_on": ["exception", "timeout"]}
    plain = s.submit(make_task("x"))
    own = s.submit(make_task("x", max_attempts=1))  # the submission's budget wins
    timed = s.submit(make_task("x", retry_on=("none_of_these",)))  # and its kinds
    _assigned(s, 0.0)
    for _ in range(3):
        assert _fail_with(s, plain, registered) == "retry"
        _assigned(s, 0.0)
    assert _fail_with(s, plain, registered) == "failed" and plain.attempts == 4
    assert "retry" not in plain.errors[-1]  # kept for the master, not in the task's history
    assert _fail_with(s, own, registered) == "failed" and own.attempts == 1
    assert _fail_with(s, timed, registered, "timeout") == "failed"


@pytest.mark.parametrize("hint", ["often", {"max_attempts": -1}, {"backoff": "1s"},
                                  {"retry_on": "timeout"}, {"surprise": 1}, {}])
def test_a_malformed_registered_policy_is_counted_and_the_masters_applies(hint: object) -> None:
    s = _scheduler(max_attempts=2)
    record = s.submit(make_task("x"))
    _assigned(s, 0.0)
    assert _fail_with(s, record, hint) == "retry"
    _assigned(s, 0.0)
    assert _fail_with(s, record, hint) == "failed" and record.attempts == 2
    assert s.bad_hints == 2


def test_without_a_backoff_a_retry_goes_at_once_as_before() -> None:
    s = _scheduler()
    record = s.submit(make_task("x"))
    _assigned(s, 0.0)
    assert _fail(s, record, 0.0) == "retry"
    assert _assigned(s, 0.0) == [record.id]


def test_retry_on_decides_which_failures_run_again() -> None:
    s = _scheduler(max_attempts=3)
    timeouts = s.submit(make_task("x", retry_on=("timeout",)))
    errors = s.submit(make_task("x", retry_on=("timeout",)))
    _assigned(s, 0.0)
    assert _fail(s, timeouts, 0.0, "timeout") == "retry"  # permanent by default, retried here
    assert _fail(s, errors, 0.0, "exception") == "failed"
    never = s.submit(make_task("x", retry_on=()))
    _assigned(s, 0.0)
    assert _fail(s, never, 0.0) == "failed" and never.attempts == 1


def test_a_delayed_task_is_not_dispatched_before_its_time_and_keeps_its_priority() -> None:
    s = _scheduler()
    late = s.submit(make_task("x", priority=9), due=5.0)
    early = s.submit(make_task("x", priority=1))
    assert _assigned(s, 0.0) == [early.id]
    assert s.next_wake(0.0) == 5.0
    assert _assigned(s, 4.99) == []
    assert _assigned(s, 5.0) == [late.id]
    assert s.next_wake(5.0) is None


def test_a_cancelled_delayed_task_never_runs() -> None:
    s = _scheduler()
    record = s.submit(make_task("x"), due=1.0)
    assert s.cancel(record.id, "no longer wanted", 0.5)[0] == "queued"
    assert _assigned(s, 2.0) == [] and s.queued == 0


def test_a_rate_limit_parks_tasks_of_that_name_and_lets_others_pass() -> None:
    s = _scheduler(rate_limits=[RateLimit("slow", 20.0)])
    slow = [s.submit(make_task("slow")) for _ in range(60)]
    fast = [s.submit(make_task("fast")) for _ in range(30)]
    first = _assigned(s, 0.0)
    assert set(r.id for r in fast) <= set(first)  # the limit holds back its own name only
    started = {r.id: 0.0 for r in slow if r.id in first}
    now = 0.0
    while len(started) < 60:
        wake = s.next_wake(now)
        assert wake is not None and wake > now
        now = wake
        started.update((i, now) for i in _assigned(s, now) if i not in started)
        assert now < 10
    times = sorted(started.values())
    assert (len(times) - 1) / (times[-1] - times[0]) == pytest.approx(20.0, rel=0.1)
    for begin in times:
        assert sum(1 for t in times if begin <= t < begin + 1.0) <= 22


# -- journal and wire -----------------------------------------------------------------------------

def test_the_journal_keeps_start_times_and_policies_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "master.sqlite3"
    journal = Journal(path)
    later = TaskRecord(spec=make_task("x", not_before=2e9, backoff=0.5, backoff_max=4.0,
                                      retry_on=("exception", "timeout")))
    plain = TaskRecord(spec=make_task("y"))
    journal.submitted([later, plain], now=1.0)
    journal.delayed([(plain, 1.9e9)])
    journal.close()
    restored = {r.id: r.spec for r, _running in Journal(path).unfinished()}
    assert restored[later.id].not_before == 2e9
    assert (restored[later.id].backoff, restored[later.id].backoff_max,
            restored[later.id].retry_on) == (0.5, 4.0, ("exception", "timeout"))
    assert restored[plain.id].not_before == 1.9e9
    assert (restored[plain.id].backoff, restored[plain.id].retry_on) == (None, None)


def test_a_journal_written_before_these_columns_gains_them(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY, name TEXT NOT NULL, call BLOB NOT NULL, "
               "priority INTEGER NOT NULL, client TEXT NOT NULL DEFAULT '', pinned TEXT NOT NULL "
               "DEFAULT '', state INTEGER NOT NULL, node TEXT NOT NULL DEFAULT '', attempts "
               "INTEGER NOT NULL DEFAULT 0, errors TEXT NOT NULL DEFAULT '[]', result BLOB, "
               "submitted REAL NOT NULL, finished REAL)")
    db.execute("INSERT INTO tasks (id, name, call, priority, state, submitted) VALUES "
               "('old', 'echo', X'929080', 5, 0, 1.0)")
    db.commit()
    db.close()
    (record, running), = Journal(path).unfinished()
    assert (record.id, running, record.spec.not_before, record.spec.backoff) == \
        ("old", False, 0.0, None)


def test_old_senders_leave_the_new_fields_out_and_bad_ones_are_refused() -> None:
    old = TaskSpec.from_dict({"id": "a", "name": "echo", "priority": 5})
    assert (old.backoff, old.backoff_max, old.retry_on, old.not_before) == (None, None, None, 0.0)
    assert "not_before" not in old.to_dict() and "retry_on" not in old.to_dict()
    spec = make_task("echo", not_before=1.9e9, backoff=1, retry_on="error,timeout")
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    for bad in ({"not_before": "soon"}, {"backoff": -1}, {"retry_on": "timeout"},
                {"retry_on": [1]}, {"backoff_max": True}):
        with pytest.raises(DecodeError):
            TaskSpec.from_dict({"id": "a", "name": "echo", **bad})
