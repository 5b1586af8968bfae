"""The node's local queue: highest priority first, FIFO within a priority."""

from __future__ import annotations

import heapq
import itertools
import threading

from core.protocol import TaskSpec

__all__ = ["PriorityTaskQueue"]


class PriorityTaskQueue:
    """Thread-safe priority queue of tasks with a bounded `get` wait."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, TaskSpec]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, task: TaskSpec) -> None:
        with self._cond:
            heapq.heappush(self._heap, (-task.priority, next(self._seq), task))
            self._cond.notify()

    def get(self, timeout: float | None = None) -> TaskSpec | None:
        """The most urgent task, waiting at most `timeout` seconds (None if none came)."""
        with self._cond:
            if not self._heap and not self._closed and timeout:
                self._cond.wait(timeout)
            if not self._heap:
                return None
            return heapq.heappop(self._heap)[2]

    def drain(self) -> list[TaskSpec]:
        """Take every queued task out at once (to hand them back on shutdown)."""
        with self._cond:
            tasks = [entry[2] for entry in sorted(self._heap)]
            self._heap.clear()
            return tasks

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._heap)
