"""The order in which queued tasks are served, for the master's scheduler and the node alike.

The rules (the board's esp32/task_queue.py keeps the same ones in a few lines of its own, as
it cannot import this; tests/priority_cases.py holds the cases all of them pass):

- Priorities 1-10 (checked by core.protocol, not here), the highest served first.
- Within a priority, submission order: every push takes the next sequence number, and ties
  are broken by it, never by comparing the items.
- Put back in front (`front=True`: a task handed back unstarted, requeued after its node was
  lost, or whose start time came) goes ahead of every task of its priority, the one put back
  last first; `push_front_many` keeps the order of the list it is given.
- Least urgent (what a full or slowed node hands back) is the reverse of the serving order:
  the lowest priority, the newest among equals.
- Removal: `remove` takes items out at once (the node's cancelled tasks). The scheduler
  instead leaves an entry where it is and skips it when it comes up (lazy deletion): the entry
  is stale once the item has been pushed again with a new sequence number (an entry's
  second field), or is no longer queued at all.
- Start times: an item pushed with a `due` time waits apart, earliest first (ties by sequence
  number); `due_items(now)` hands out those whose time came, which the caller pushes in front
  of their priority.

An entry is the tuple (-priority, seq, item); `heap` is the list of entries, a heapq heap. A
loop that takes every task (the scheduler's dispatch, a node's workers) may pop it with
heapq.heappop and push a popped entry back with heapq.heappush itself (a method call per
task would cost more than the pop); anything else goes through the methods, which alone hand
out sequence numbers.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Generic, Iterable, Iterator, Protocol, TypeVar

__all__ = ["PriorityQueue", "Entry", "Prioritized"]


class Prioritized(Protocol):
    """An item that carries its own priority (a TaskSpec), for the batch pushes."""

    @property
    def priority(self) -> int: ...


T = TypeVar("T")
P = TypeVar("P", bound=Prioritized)
Entry = tuple[int, int, T]  # (-priority, seq, item): smaller is served first


class PriorityQueue(Generic[T]):
    """A heap of items by priority, then sequence number, with start times kept apart.

    Not locked: the scheduler runs on one thread; the node wraps it in its own condition."""

    __slots__ = ("heap", "_delayed", "_back", "_front")

    def __init__(self) -> None:
        self.heap: list[Entry[T]] = []
        self._delayed: list[tuple[float, int, T]] = []  # (due, seq, item)
        self._back = itertools.count(1)
        self._front = itertools.count(-1, -1)

    def push(self, item: T, priority: int, front: bool = False, due: float = 0.0) -> int:
        """Queue `item` behind its priority (ahead of it if `front`), or, with a start time
        `due` (0: none), among the waiting ones; its sequence number. (Positional: the
        scheduler calls it for every task.)"""
        seq = next(self._front) if front else next(self._back)
        if due:
            heapq.heappush(self._delayed, (due, seq, item))
        else:
            heapq.heappush(self.heap, (-priority, seq, item))
        return seq

    def push_many(self: PriorityQueue[P], items: Iterable[P]) -> int:
        """Queue a batch behind their own priorities, in the order given; how many."""
        heap, seq, push = self.heap, self._back, heapq.heappush
        before = len(heap)
        for item in items:
            push(heap, (-item.priority, next(seq), item))
        return len(heap) - before

    def push_front_many(self: PriorityQueue[P], items: list[P]) -> None:
        """Put a batch back ahead of the others of their own priorities, in the order
        given."""
        heap, seq, push = self.heap, self._front, heapq.heappush
        for item in reversed(items):
            push(heap, (-item.priority, next(seq), item))

    def push_entry(self, entry: Entry[T]) -> None:
        """Queue an entry popped from a queue, unchanged (its place is kept)."""
        heapq.heappush(self.heap, entry)

    def pop_entry(self) -> Entry[T]:
        """The most urgent entry, taken out (IndexError if there is none)."""
        return heapq.heappop(self.heap)

    def pop(self) -> T:
        """The most urgent item, taken out (IndexError if there is none)."""
        return heapq.heappop(self.heap)[2]

    def pop_many(self, count: int) -> list[T]:
        """Up to `count` most urgent items, in serving order."""
        heap, pop = self.heap, heapq.heappop
        return [pop(heap)[2] for _ in range(min(count, len(heap)))]

    def peek(self) -> T | None:
        """The item `pop` would return, left in place; None if there is none."""
        return self.heap[0][2] if self.heap else None

    def take_least_urgent(self, count: int) -> list[T]:
        """Take out up to `count` items that would be served last, the last one first."""
        heap = self.heap
        if count <= 0 or not heap:
            return []
        ordered = sorted(heap)
        cut = max(0, len(ordered) - count)
        heap[:] = ordered[:cut]  # a sorted list is a valid heap; `heap` stays the same list
        return [entry[2] for entry in reversed(ordered[cut:])]

    def remove(self, unwanted: Callable[[T], bool]) -> list[T]:
        """Take out at once the queued items `unwanted` says yes to (start times aside)."""
        heap = self.heap
        gone = [entry[2] for entry in heap if unwanted(entry[2])]
        if gone:
            heap[:] = [entry for entry in heap if not unwanted(entry[2])]
            heapq.heapify(heap)
        return gone

    def drain(self) -> list[T]:
        """Take out every queued item at once, in serving order (start times aside)."""
        items = [entry[2] for entry in sorted(self.heap)]
        self.heap.clear()
        return items

    def due_items(self, now: float) -> Iterator[tuple[int, T]]:
        """(seq, item) of the waiting items whose start time is `now` or earlier, earliest
        first, each taken out of the waiting ones as it is handed out."""
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _due, seq, item = heapq.heappop(delayed)
            yield seq, item

    def next_due(self) -> float | None:
        """The earliest start time still waiting (None: nothing waits)."""
        return self._delayed[0][0] if self._delayed else None

    def __len__(self) -> int:
        """Items queued, stale entries included, start times aside."""
        return len(self.heap)

    def __bool__(self) -> bool:
        return bool(self.heap)
