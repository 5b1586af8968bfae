"""TaskHandle: a submitted task's id and a way to await its outcome (threads or asyncio)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from core.errors import FabricError, FabricTimeout, TaskFailed
from core.protocol import TaskOutcome

__all__ = ["TaskHandle"]


class TaskHandle:
    """Returned by `submit`: `.id`, `.result(timeout)`, `.outcome(timeout)`, or `await handle`."""

    __slots__ = ("id", "future")

    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self.future: concurrent.futures.Future[TaskOutcome] = concurrent.futures.Future()

    def done(self) -> bool:
        return self.future.done()

    def outcome(self, timeout: float | None = None) -> TaskOutcome:
        """The final outcome (completed or failed); FabricTimeout if it is not there in time."""
        try:
            return self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise FabricTimeout(f"task {self.id} did not finish within {timeout}s") from None

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value; raises TaskFailed with the reasons if it failed."""
        outcome = self.outcome(timeout)
        if outcome.state != "completed":
            raise TaskFailed(self.id, outcome.error or {"kind": outcome.state, "message": ""})
        return outcome.value

    async def wait(self) -> Any:
        """The task's value, for asyncio code (`await handle.wait()` or `await handle`)."""
        outcome = await asyncio.wrap_future(self.future)
        if outcome.state != "completed":
            raise TaskFailed(self.id, outcome.error or {"kind": outcome.state, "message": ""})
        return outcome.value

    def __await__(self):
        return self.wait().__await__()

    # -- used by the side that learns the outcome --------------------------------------------

    def resolve(self, outcome: TaskOutcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)

    def reject(self, error: FabricError) -> None:
        if not self.future.done():
            self.future.set_exception(error)
