"""The node's local queue: what it holds, in the scheduler's order (core.priority_queue:
highest priority first, FIFO within a priority), and how much it should hold.

How much: a node holds `capacity` running tasks plus `prefetch` waiting ones. A fixed small
prefetch keeps slow tasks spread over nodes but makes tiny tasks wait a round trip each; so by
default the prefetch follows the measured task duration: enough queued work for `window`
seconds of this node's workers (`capacity * window / mean duration`), never below the
configured floor (capacity) and never above a ceiling. Slow tasks keep the floor, tiny ones
travel in batches of up to the ceiling. When tasks turn slow, the node hands back what it
holds beyond the new limit, so the bound holds again within one task's duration.
"""

from __future__ import annotations

import heapq
import math
import threading
from typing import Iterable

from core.priority_queue import PriorityQueue
from core.protocol import TaskSpec

__all__ = ["PriorityTaskQueue", "PrefetchGauge", "adaptive_prefetch"]


class PriorityTaskQueue:
    """Thread-safe queue of tasks in core.priority_queue's order, with a bounded `get` wait."""

    def __init__(self) -> None:
        self._queue: PriorityQueue[TaskSpec] = PriorityQueue()
        self._heap = self._queue.heap  # workers pop it with heapq: see core.priority_queue
        self._cond = threading.Condition()
        self._closed = False

    def put(self, task: TaskSpec) -> None:
        with self._cond:
            self._queue.push(task, task.priority)
            self._cond.notify()

    def put_many(self, tasks: Iterable[TaskSpec]) -> int:
        """Queue a batch under one lock; wake as many workers as tasks came (how many)."""
        with self._cond:
            added = self._queue.push_many(tasks)
            if added:
                self._cond.notify(added)
            return added

    def get(self, timeout: float | None = None) -> TaskSpec | None:
        """The most urgent task, waiting at most `timeout` seconds (None if none came)."""
        with self._cond:
            if not self._heap and not self._closed and timeout:
                self._cond.wait(timeout)
            return heapq.heappop(self._heap)[2] if self._heap else None

    def put_front(self, tasks: list[TaskSpec]) -> None:
        """Give back tasks taken but not started: ahead of the others of their priority, in
        the order given."""
        with self._cond:
            self._queue.push_front_many(tasks)
            self._cond.notify(len(tasks))

    def get_many(self, count: int, timeout: float | None = None) -> list[TaskSpec]:
        """Up to `count` most urgent tasks, in order, waiting at most `timeout` for the first."""
        with self._cond:
            heap = self._heap
            if not heap and not self._closed and timeout:
                self._cond.wait(timeout)
            if count == 1 or len(heap) <= 1:
                return [heapq.heappop(heap)[2]] if heap else []
            return self._queue.pop_many(count)

    def take_least_urgent(self, count: int) -> list[TaskSpec]:
        """Remove up to `count` tasks that would run last (to hand them back), last first."""
        with self._cond:
            return self._queue.take_least_urgent(count)

    def remove(self, task_ids: set[str]) -> list[TaskSpec]:
        """Take the queued tasks with these ids out (cancelled before they started)."""
        with self._cond:
            return self._queue.remove(lambda task: task.id in task_ids)

    def drain(self) -> list[TaskSpec]:
        """Take every queued task out at once (to hand them back on shutdown)."""
        with self._cond:
            return self._queue.drain()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._queue)


def adaptive_prefetch(capacity: int, mean_seconds: float, *, window: float, floor: int,
                      ceiling: int) -> int:
    """Queued tasks worth `window` seconds of `capacity` workers, within floor..ceiling."""
    if mean_seconds <= 0.0:
        return max(floor, ceiling)
    wanted = math.ceil(capacity * window / mean_seconds)
    return max(floor, min(ceiling, wanted))


class PrefetchGauge:
    """Follows the task duration, the prefetch it implies, and how many tiny tasks a worker
    takes at once (`group`: about a millisecond of them, so an urgent task arriving behind a
    group waits at most that long).

    A sample is the median of the last five durations, so one task stalled by a pause (a
    preempted thread, a collection) moves nothing, while three slow tasks in a row do; the
    samples are then weighted exponentially. A task much slower than the mean is looked at
    at once; otherwise the estimate is refreshed every eighth task, which keeps tiny tasks
    cheap to account.
    """

    GROUP_SECONDS = 0.001
    _MAX_GROUP = 64

    def __init__(self, *, capacity: int, floor: int, ceiling: int, window: float,
                 weight: float = 0.3) -> None:
        self.capacity = capacity
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.window = window
        self.weight = weight
        self.mean = 0.0
        self.prefetch = floor
        self.group = 1
        self._recent = [0.0] * 5
        self._seen = 0
        self._alarm = 0.0  # a sample above this is looked at at once

    def record(self, seconds: float) -> int:
        """Account one finished task; the prefetch now in force."""
        seen = self._seen
        self._recent[seen % 5] = seconds
        self._seen = seen = seen + 1
        if seen > 5 and seen & 7 and seconds <= self._alarm:
            return self.prefetch
        sample = sorted(self._recent[:seen])[min(seen, 5) // 2]
        mean = self.mean
        mean = sample if mean == 0.0 else mean + (sample - mean) * self.weight
        self.mean = mean
        self._alarm = 2.0 * mean
        self.prefetch = adaptive_prefetch(self.capacity, mean, window=self.window,
                                          floor=self.floor, ceiling=self.ceiling)
        self.group = max(1, min(self._MAX_GROUP, int(self.GROUP_SECONDS / mean))) \
            if mean > 0.0 else 1
        return self.prefetch
