"""The job's feeder: a thread that reads shards and submits them, within a window.

Submitting waits for the master's acknowledgement (the task is journalled), and reading a
shard takes a few milliseconds; both overlap with collecting results on the job's own
thread. The window bounds the shards in flight, so memory stays bounded whatever the
input's size, and scales with the nodes' slots.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from core.errors import ConfigError, FabricTimeout
from master.handles import TaskHandle
from master.primes_job.plan import TASK_OVERHEAD_BYTES, Shard, task_id

__all__ = ["Window", "Feeder", "Submitted", "SUBMIT_BYTES"]

# One submission message stays far below the broker's packet limit (1 MiB in broker.conf).
SUBMIT_BYTES = 512 * 1024
_WAIT = 0.2


class Window:
    """A resizable count of free slots for shards in flight."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._used = 0
        self._cond = threading.Condition()

    def acquire(self, timeout: float) -> bool:
        with self._cond:
            if self._used >= self._size:
                self._cond.wait(timeout)
            if self._used >= self._size:
                return False
            self._used += 1
            return True

    def try_acquire(self) -> bool:
        return self.acquire(0)

    def release(self) -> None:
        with self._cond:
            self._used = max(0, self._used - 1)
            self._cond.notify()

    def resize(self, size: int) -> None:
        with self._cond:
            self._size = size
            self._cond.notify_all()

    @property
    def size(self) -> int:
        return self._size

    @property
    def used(self) -> int:
        return self._used


@dataclass
class Submitted:
    """A shard's task, journalled by the master; what the job waits on."""

    shard: Shard
    attempt: int
    handle: TaskHandle
    submitted: float


class Feeder:
    """Reads shards (skipping those done by an earlier run) and submits them as tasks."""

    def __init__(self, client: Any, shards: Iterator[Shard], *, job_id: str, task_name: str,
                 priority: int, window: Window, done_before: set[int],
                 attempts: dict[int, int], ack_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.job_id = job_id
        self.task_name = task_name
        self.priority = priority
        self.window = window
        self.ack_timeout = ack_timeout
        self.submitted: queue.SimpleQueue[Submitted] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.reader_done = False
        self.numbers_read = 0
        self.shards_seen = 0
        self.shards_skipped = 0
        self.numbers_skipped = 0
        self.active = 0            # shards read (not skipped) whose fate is not settled
        self._shards = shards
        self._done_before = done_before
        self._attempts = attempts
        self._clock = clock
        self._retry: deque[tuple[float, Shard, int]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="primes-feeder", daemon=True)

    # -- driven by the job's thread ----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.window.resize(self.window.size)  # wake a wait for a slot
        self._thread.join(timeout)

    def retry(self, shard: Shard, attempt: int, delay: float) -> None:
        """Submit `shard` again as `attempt` after `delay` seconds (its slot was released)."""
        with self._lock:
            self._retry.append((self._clock() + delay, shard, attempt))

    def settled(self) -> None:
        """One shard is done or given up."""
        with self._lock:
            self.active -= 1

    @property
    def finished(self) -> bool:
        """Everything read, and every shard read settled."""
        with self._lock:
            return self.reader_done and self.active == 0 and not self._retry

    @property
    def retries_waiting(self) -> int:
        with self._lock:
            return len(self._retry)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.window.acquire(_WAIT):
                    continue
                group = []
                size = 0
                while True:
                    item = self._next()
                    if item is None:
                        self.window.release()
                        break
                    group.append(item)
                    size += item[0].cost + TASK_OVERHEAD_BYTES
                    if size >= SUBMIT_BYTES or not self.window.try_acquire():
                        break
                if group:
                    self._submit(group)
                elif self.reader_done:
                    self._stop.wait(_WAIT / 4)  # only retries can come: look again shortly
        except OSError as e:  # an input file vanished or became unreadable mid-job
            self.error = ConfigError(f"reading the input failed: {e}; run the same command "
                                     "again to resume once it is readable")
        except BaseException as e:  # handed to the job's thread, which reports it
            self.error = e

    def _next(self) -> tuple[Shard, int] | None:
        with self._lock:
            if self._retry and self._retry[0][0] <= self._clock():
                _due, shard, attempt = self._retry.popleft()
                return shard, attempt
        while not self.reader_done:
            shard = next(self._shards, None)
            if shard is None:
                self.reader_done = True
                break
            self.shards_seen += 1
            self.numbers_read += len(shard.numbers)
            if shard.index in self._done_before:
                self.shards_skipped += 1
                self.numbers_skipped += len(shard.numbers)
                continue
            with self._lock:
                self.active += 1
            return shard, self._attempts.get(shard.index, 0)
        return None

    def _submit(self, group: list[tuple[Shard, int]]) -> None:
        calls = [(self.task_name, [shard.wire], {}, self.priority,
                  task_id(self.job_id, shard.index, attempt)) for shard, attempt in group]
        try:
            handles = self.client.submit_many(calls, ack_timeout=self.ack_timeout)
        except FabricTimeout as e:
            raise FabricTimeout(f"the master did not accept shards within "
                                f"{self.ack_timeout:g}s ({e}); run the same command again "
                                "to resume") from e
        now = self._clock()
        for (shard, attempt), handle in zip(group, handles):
            self.submitted.put(Submitted(shard, attempt, handle, now))
