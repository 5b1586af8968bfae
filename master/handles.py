"""TaskHandle: a submitted task's id and a way to await its outcome (threads or asyncio)."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable

from core import states
from core.defaults import DEFAULT_WAIT
from core.errors import FabricError, FabricTimeout, TaskFailed
from core.protocol import TaskOutcome

__all__ = ["TaskHandle", "wait_future"]


# Guards the hand-over between a handle's resolver and the first to ask for its Future: one
# lock for all handles costs nothing while uncontended, where a Future per handle (a Condition
# and its lock, made for every task) was most of a submitter's CPU.
_guard = threading.Lock()


class TaskHandle:
    """Returned by `submit`: `.id`, `.result(timeout)`, `.outcome(timeout)`, or `await handle`.

    Every wait ends: after `timeout` seconds (`DEFAULT_WAIT`, 300, unless told; `None` waits
    until the task ends) it raises FabricTimeout, and the task goes on. The outcome is stored
    on the handle; a `concurrent.futures.Future` (`.future`) is made only for a handle someone
    waits on before its outcome is there."""

    __slots__ = ("id", "_outcome", "_error", "_future")

    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self._outcome: TaskOutcome | None = None
        self._error: FabricError | None = None
        self._future: concurrent.futures.Future[TaskOutcome] | None = None

    @property
    def future(self) -> concurrent.futures.Future[TaskOutcome]:
        """The outcome as a Future (for `concurrent.futures.wait` and asyncio)."""
        with _guard:
            future = self._future
            if future is None:
                future = self._future = concurrent.futures.Future()
                if self._outcome is not None:
                    future.set_result(self._outcome)
                elif self._error is not None:
                    future.set_exception(self._error)
            return future

    def done(self) -> bool:
        return self._outcome is not None or self._error is not None

    def outcome(self, timeout: float | None = DEFAULT_WAIT) -> TaskOutcome:
        """The final outcome (completed or failed); FabricTimeout if it is not there within
        `timeout` seconds (None: wait until it is)."""
        outcome = self._outcome
        if outcome is not None:
            return outcome
        if self._error is not None:
            raise self._error
        try:
            return self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(timeout) from None

    def result(self, timeout: float | None = DEFAULT_WAIT) -> Any:
        """The task's return value; raises TaskFailed with the reasons if it failed, and
        FabricTimeout as `outcome` does."""
        outcome = self.outcome(timeout)
        if outcome.state != states.COMPLETED:
            raise TaskFailed(self.id, outcome.error or {"kind": outcome.state, "message": ""})
        return outcome.value

    async def wait(self, timeout: float | None = DEFAULT_WAIT) -> Any:
        """The task's value, for asyncio code (`await handle.wait()` or `await handle`);
        FabricTimeout after `timeout` seconds, as `result` (None: no end)."""
        outcome = await wait_future(self.future, timeout, lambda: self._timed_out(timeout))
        if outcome.state != states.COMPLETED:
            raise TaskFailed(self.id, outcome.error or {"kind": outcome.state, "message": ""})
        return outcome.value

    def __await__(self):
        return self.wait().__await__()

    def _timed_out(self, timeout: float | None) -> FabricTimeout:
        return FabricTimeout(f"task {self.id} did not finish within {timeout:g}s")

    # -- used by the side that learns the outcome --------------------------------------------

    def resolve(self, outcome: TaskOutcome) -> None:
        """Set the outcome; the first of resolve/reject wins."""
        self._settle(outcome, None)

    def reject(self, error: FabricError) -> None:
        self._settle(None, error)

    def _settle(self, outcome: TaskOutcome | None, error: FabricError | None) -> None:
        with _guard:
            if self._outcome is not None or self._error is not None:
                return
            self._outcome, self._error = outcome, error
            future = self._future
        if future is None:
            return
        try:
            if error is None:
                future.set_result(outcome)
            else:
                future.set_exception(error)
        except concurrent.futures.InvalidStateError:  # cancelled by whoever waited on it
            pass


async def wait_future(future: concurrent.futures.Future, timeout: float | None,
                      timed_out: Callable[[], FabricTimeout]) -> Any:
    """`future`'s result for asyncio code, waiting at most `timeout` seconds (None: no end),
    then `timed_out()` is raised. Giving up leaves `future` as it is, for its other waiters
    (awaiting a wrapped Future and cancelling it would cancel theirs too)."""
    import asyncio  # here: a client that never awaits does not load asyncio at start-up
    loop = asyncio.get_running_loop()
    ended = loop.create_future()

    def wake(_future: concurrent.futures.Future) -> None:
        try:
            loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(None))
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    future.add_done_callback(wake)
    try:
        await asyncio.wait_for(ended, timeout)
    except asyncio.TimeoutError:
        raise timed_out() from None
    return future.result(0)
