"""master.renewal.Renewer: the renewal loop shared by the root claim and the lease holder."""

from __future__ import annotations

import threading
from typing import Callable

from master.renewal import Renewer


def hand_clock() -> tuple[list[float], Callable[[], float]]:
    """A clock the test moves by hand (`now[0] = ...`); the renewer's waits stay real."""
    now = [100.0]
    return now, lambda: now[0]


def test_renews_on_its_interval_by_its_own_clock_and_at_once_when_asked() -> None:
    now, clock = hand_clock()
    renewed: list[float] = []
    event = threading.Event()

    def renew(now: float) -> None:
        renewed.append(now)
        event.set()

    renewer = Renewer(renew, every=10.0, poll=0.01, clock=clock, name="test-renewer")
    renewer.start()
    try:
        assert not event.wait(0.2) and renewed == []  # its clock has not moved: nothing due
        now[0] = 110.0
        assert event.wait(5.0) and renewed == [110.0]
        event.clear()
        renewer.renew_soon()  # not due for another 10 s of its clock
        assert event.wait(5.0) and renewed == [110.0, 110.0]
    finally:
        renewer.stop()
    assert not renewer.running


def test_a_failing_check_ends_it_and_it_starts_again() -> None:
    now, clock = hand_clock()
    checks: list[bool] = []
    allowed = threading.Event()
    ended = threading.Event()

    def check() -> bool:
        checks.append(allowed.is_set())
        if not allowed.is_set():
            ended.set()
        return allowed.is_set()

    renewed = threading.Event()
    renewer = Renewer(lambda _now: renewed.set(), every=1.0, poll=0.01, clock=clock,
                      check=check, name="test-renewer")
    renewer.start()
    assert ended.wait(5.0) and checks[-1] is False and not renewed.is_set()
    renewer.stop()
    allowed.set()
    renewer.start()
    now[0] += 1.0
    try:
        assert renewed.wait(5.0)
    finally:
        renewer.stop(timeout=5.0)


def test_stop_from_the_renewing_thread_does_not_wait_for_itself() -> None:
    _now, clock = hand_clock()
    done = threading.Event()
    holder: list[Renewer] = []

    def renew(now: float) -> None:
        holder[0].stop(timeout=5.0)  # as a lease holder deposed while renewing
        done.set()

    renewer = Renewer(renew, every=1.0, poll=0.01, clock=clock, name="test-renewer")
    holder.append(renewer)
    renewer.start()
    renewer.renew_soon()
    assert done.wait(5.0) and not renewer.running
