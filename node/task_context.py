"""What a task running on a node's worker thread may ask about itself: its id and attempt,
and whether it was cancelled.

A thread cannot be stopped from outside, so a cancelled task on a thread worker is told, not
killed: a long task checks `cancelled()` now and then, or waits with `sleep`/`wait`, which
return as soon as the task is cancelled. Whatever it does, its late result is dropped: the
node reports the task `cancelled`, and its slot is free once the function returns.

On a process-pool node (`compute-node --pool process`) a cancelled or timed-out task is
killed with its worker process instead: there `cancelled()` stays False and `sleep` is a
plain sleep, so the same task code works on both pools.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from core.errors import TaskError

__all__ = ["TaskContext", "current_task", "cancelled", "sleep", "CANCELLED_ERROR", "running"]

CANCELLED_ERROR = {"kind": "cancelled", "type": "Cancelled", "message": "cancelled"}

# the task each worker thread runs now (`task`) and the node it runs for (`node`); the node
# sets both before each task and clears `task` after it (and `output`: what the task printed,
# see node.task_output)
running = threading.local()
_local = running


class _Holder(Protocol):
    def is_cancelled(self, task_id: str) -> bool: ...
    def cancel_event(self, task_id: str) -> threading.Event: ...


class TaskContext:
    """The running task as it sees itself."""

    __slots__ = ("id", "attempt", "name", "_node")

    def __init__(self, task: Any, node: _Holder) -> None:
        self.id: str = task.id
        self.attempt: int = task.attempt
        self.name: str = task.name
        self._node = node

    @property
    def cancelled(self) -> bool:
        return self._node.is_cancelled(self.id)

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds`; True as soon as the task is cancelled (False at the end)."""
        if self.cancelled:
            return True
        return self._node.cancel_event(self.id).wait(max(0.0, seconds))

    def check(self) -> None:
        """Raise TaskError(kind `cancelled`) if the task was cancelled: a place to stop."""
        if self.cancelled:
            raise TaskError(dict(CANCELLED_ERROR))


def current_task() -> TaskContext | None:
    """The task this thread runs now, or None outside a node's task."""
    task = getattr(_local, "task", None)
    return None if task is None else TaskContext(task, _local.node)


def cancelled() -> bool:
    """Whether the task this thread runs was cancelled (False outside a task)."""
    task = getattr(_local, "task", None)
    return task is not None and _local.node.is_cancelled(task.id)


def sleep(seconds: float) -> None:
    """`time.sleep` that ends at once, raising TaskError(kind `cancelled`), if the running
    task is cancelled meanwhile (a plain sleep outside a task)."""
    context = current_task()
    if context is None:
        time.sleep(seconds)
    elif context.wait(seconds):
        raise TaskError(dict(CANCELLED_ERROR))
