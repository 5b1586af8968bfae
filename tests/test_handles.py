"""TaskHandle: what a submitter relies on, whether the outcome arrives before or after it waits,
from another thread, through its Future, or through asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from core.errors import FabricTimeout, QueueFull, TaskFailed
from core.protocol import TaskOutcome
from master.handles import TaskHandle


def completed(task_id: str, value: object) -> TaskOutcome:
    return TaskOutcome(id=task_id, state="completed", value=value, error=None, node_id="n1",
                       attempts=1)


def test_an_outcome_set_before_anyone_waits_is_returned_without_a_future() -> None:
    handle = TaskHandle("t1")
    assert not handle.done()
    handle.resolve(completed("t1", 42))
    assert handle.done() and handle.result(timeout=0) == 42
    assert handle.future.result(timeout=0).value == 42  # a late Future carries it too


def test_a_waiter_blocked_before_the_outcome_wakes_when_another_thread_sets_it() -> None:
    handle = TaskHandle("t2")
    waiting = threading.Event()
    got: list[object] = []

    def wait() -> None:
        waiting.set()
        got.append(handle.result(timeout=10))

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert waiting.wait(5)
    handle.resolve(completed("t2", "done"))
    waiter.join(10)
    assert got == ["done"]


def test_the_first_outcome_wins() -> None:
    handle = TaskHandle("t3")
    future = handle.future
    handle.resolve(completed("t3", 1))
    handle.resolve(completed("t3", 2))
    handle.reject(QueueFull("late"))
    assert handle.result(timeout=0) == 1 and future.result(timeout=0).value == 1


def test_a_rejected_task_raises_its_error_and_a_failed_one_task_failed() -> None:
    rejected = TaskHandle("t4")
    rejected.reject(QueueFull("queue is full"))
    with pytest.raises(QueueFull):
        rejected.result(timeout=0)
    with pytest.raises(QueueFull):
        rejected.future.result(timeout=0)
    failed = TaskHandle("t5")
    failed.resolve(TaskOutcome(id="t5", state="failed", value=None, node_id="n1", attempts=3,
                               error={"kind": "timeout", "message": "took too long"}))
    with pytest.raises(TaskFailed, match="took too long"):
        failed.result(timeout=0)


def test_waiting_past_the_timeout_is_a_fabric_timeout() -> None:
    with pytest.raises(FabricTimeout):
        TaskHandle("t6").result(timeout=0.01)


def test_a_cancelled_future_does_not_break_the_resolver() -> None:
    handle = TaskHandle("t7")
    assert handle.future.cancel()
    handle.resolve(completed("t7", 7))
    assert handle.result(timeout=0) == 7


def test_asyncio_code_awaits_a_handle() -> None:
    handle = TaskHandle("t8")

    async def main() -> object:
        asyncio.get_running_loop().call_later(0.01, handle.resolve, completed("t8", "async"))
        return await handle

    assert asyncio.run(main()) == "async"


def test_futures_wait_sees_handles_resolved_before_and_after() -> None:
    early, late = TaskHandle("a"), TaskHandle("b")
    early.resolve(completed("a", 1))
    futures = [early.future, late.future]
    late.resolve(completed("b", 2))
    done, pending = concurrent.futures.wait(futures, timeout=5)
    assert len(done) == 2 and not pending
