"""The job's feeder: a thread that reads shards and submits them, within a window.

Submitting waits for the master's acknowledgement (the task is journalled), and reading a
shard takes a few milliseconds; both overlap with collecting results on the job's own
thread, and with each other: a few groups of shards are asked about and submitted at once
(SUBMITTERS threads), so the client's round trips to the master do not pace the nodes. The window bounds the shards in flight, so memory stays bounded whatever the
input's size, and scales with the nodes' slots.

Before it submits, the feeder asks the master what it knows of the shards' task ids: a shard
the master finished before this run (the same numbers, by the id's digest) is taken from
there, so the summary can tell it from a shard run now, and an id the master holds as failed
(or cancelled) is passed over for the shard's next attempt, so a rerun tries it again.

Shards are either form (plan.py): numbers, counted as they are read, or ranges of lines,
whose numbers are known once a node has parsed them (or from the checkpoint, when skipped).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from core.errors import ConfigError, FabricError, FabricTimeout
from core import states
from core.protocol import TaskOutcome
from master.errors import StaleCheckpoint
from master.handles import TaskHandle
from master.primes_job.plan import TASK_OVERHEAD_BYTES, Shard, task_digest, task_id
from master.primes_job.ranges import RangeShard

__all__ = ["Window", "Feeder", "Submitted", "StaleCheckpoint", "SUBMIT_BYTES",
           "MAX_KNOWN_FAILURES"]

log = logging.getLogger(__name__)

# One submission message stays far below the broker's packet limit (1 MiB in broker.conf).
SUBMIT_BYTES = 512 * 1024
# Ids of one shard the master may hold as failed from earlier runs before the next one is
# submitted all the same (its stored failure then counts as this run's).
MAX_KNOWN_FAILURES = 16
# Groups of shards being asked about and submitted at once.
SUBMITTERS = 3
_QUERY_IDS = 500
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
    """A shard's task, journalled by the master (or already finished there: `reused`); what
    the job waits on."""

    shard: Shard | RangeShard
    attempt: int
    digest: str
    handle: TaskHandle
    submitted: float
    reused: bool = False


class Feeder:
    """Reads shards (skipping those the checkpoint holds as done, by index and digest) and
    submits them as tasks."""

    def __init__(self, client: Any, shards: Iterator[Shard | RangeShard], *, job_id: str,
                 task_name: str, priority: int, window: Window, done_before: dict[int, str],
                 attempts: dict[int, int], ack_timeout: float,
                 done_counts: dict[int, tuple[int, int]] | None = None,
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
        self.shards_skipped = 0    # done by an earlier run, from the checkpoint
        self.numbers_skipped = 0
        self.bad_skipped = 0       # bad lines in range shards skipped (numbers: read again)
        self.known_failures = 0    # ids passed over: the master holds them as failed
        self.active = 0            # shards read (not skipped) whose fate is not settled
        self._shards = shards
        self._done_before = done_before
        self._done_counts = done_counts or {}
        self._attempts = attempts
        self._clock = clock
        self._retry: deque[tuple[float, Shard, str, int]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._retried = threading.Event()  # a retry was queued (or stop): the reader looks again
        self._thread = threading.Thread(target=self._run, name="primes-feeder", daemon=True)
        self._pool = ThreadPoolExecutor(max_workers=SUBMITTERS,
                                        thread_name_prefix="primes-submit")
        self._sending: set[Future] = set()

    # -- driven by the job's thread ----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading; wait (bounded) for the submissions under way."""
        self._stop.set()
        self._retried.set()
        self.window.resize(self.window.size)  # wake a wait for a slot
        self._thread.join(timeout)
        with self._lock:
            sending = list(self._sending)
        wait_futures(sending, timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def retry(self, shard: Shard, digest: str, attempt: int, delay: float) -> None:
        """Submit `shard` again as `attempt` after `delay` seconds (its slot was released)."""
        with self._lock:
            self._retry.append((self._clock() + delay, shard, digest, attempt))
        self._retried.set()

    def settled(self) -> None:
        """One shard is done or given up."""
        with self._lock:
            self.active -= 1

    @property
    def finished(self) -> bool:
        """Everything read, and every shard read settled."""
        with self._lock:
            return self.reader_done and self.active == 0 and not self._retry

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
                    self._send(group)
                elif self.reader_done:  # only retries can come: until one is queued or due
                    self._retried.wait(self._until_retry())
                    self._retried.clear()
        except OSError as e:  # an input file vanished or became unreadable mid-job
            self.error = ConfigError(f"reading the input failed: {e}; run the same command "
                                     "again to resume once it is readable")
        except BaseException as e:  # handed to the job's thread, which reports it
            self.error = e

    def _until_retry(self) -> float:
        """Seconds until the next queued retry is due (at most `_WAIT`: the clock may not be
        the wall's)."""
        with self._lock:
            if not self._retry:
                return _WAIT
            return max(0.0, min(_WAIT, self._retry[0][0] - self._clock()))

    def _next(self) -> tuple[Shard, str, int] | None:
        with self._lock:
            if self._retry and self._retry[0][0] <= self._clock():
                _due, shard, digest, attempt = self._retry.popleft()
                return shard, digest, attempt
        while not self.reader_done:
            shard = next(self._shards, None)
            if shard is None:
                self.reader_done = True
                break
            self.shards_seen += 1
            count = shard.count
            if count is not None:
                self.numbers_read += count
            digest = task_digest(self.task_name, [shard.wire])
            done = self._done_before.get(shard.index)
            if done is not None:
                if done != digest:
                    raise StaleCheckpoint(f"shard {shard.index} of the input holds other "
                                          "numbers than when it was checkpointed")
                self.shards_skipped += 1
                if count is None:  # a range: its counts are the checkpoint's
                    count, bad = self._done_counts.get(shard.index, (0, 0))
                    self.numbers_read += count
                    self.bad_skipped += bad
                self.numbers_skipped += count
                continue
            with self._lock:
                self.active += 1
            return shard, digest, self._attempts.get(shard.index, 0)
        return None

    def _send(self, group: list[tuple[Shard | RangeShard, str, int]]) -> None:
        """Ask about and submit `group` on a submitter thread; at most SUBMITTERS at once."""
        while True:
            with self._lock:
                self._sending = {f for f in self._sending if not f.done()}
                busy = list(self._sending)
            if len(busy) < SUBMITTERS:
                break
            wait_futures(busy, timeout=_WAIT, return_when="FIRST_COMPLETED")
        future = self._pool.submit(self._submit_safely, group)
        with self._lock:
            self._sending.add(future)

    def _submit_safely(self, group: list[tuple[Shard | RangeShard, str, int]]) -> None:
        try:
            self._submit(group)
        except BaseException as e:  # handed to the job's thread, which reports it
            self.error = e

    def _submit(self, group: list[tuple[Shard, str, int]]) -> None:
        """Take what the master finished already; submit the rest."""
        fresh = []
        for _round in range(MAX_KNOWN_FAILURES + 1):
            ids = {task_id(self.job_id, shard.index, digest, attempt): (shard, digest, attempt)
                   for shard, digest, attempt in group}
            known = self._known(list(ids))
            group = []
            for tid, (shard, digest, attempt) in ids.items():
                outcome = known.get(tid)
                if outcome is not None and outcome.state == states.COMPLETED:
                    handle = TaskHandle(tid)
                    handle.resolve(outcome)
                    self.submitted.put(Submitted(shard, attempt, digest, handle, self._clock(),
                                                 reused=True))
                elif outcome is not None and outcome.state in (states.FAILED, states.CANCELLED) \
                        and _round < MAX_KNOWN_FAILURES:
                    with self._lock:
                        self.known_failures += 1
                    group.append((shard, digest, attempt + 1))
                else:
                    fresh.append((shard, digest, attempt))
            if not group:
                break
        if not fresh:
            return
        calls = [(self.task_name, [shard.wire], {}, self.priority,
                  task_id(self.job_id, shard.index, digest, attempt))
                 for shard, digest, attempt in fresh]
        try:
            handles = self.client.submit_many(calls, ack_timeout=self.ack_timeout)
        except FabricTimeout as e:
            raise FabricTimeout(f"the master did not accept shards within "
                                f"{self.ack_timeout:g}s ({e}); run the same command again "
                                "to resume") from e
        now = self._clock()
        for (shard, digest, attempt), handle in zip(fresh, handles):
            self.submitted.put(Submitted(shard, attempt, digest, handle, now))

    def _known(self, ids: list[str]) -> dict[str, TaskOutcome]:
        """The master's finished outcomes among `ids` (from this job's earlier runs)."""
        known: dict[str, TaskOutcome] = {}
        for start in range(0, len(ids), _QUERY_IDS):
            try:
                data = self.client.query("outcomes", {"ids": ids[start:start + _QUERY_IDS]},
                                         timeout=self.ack_timeout)
            except FabricTimeout as e:
                raise FabricTimeout(f"the master did not answer about shards within "
                                    f"{self.ack_timeout:g}s ({e}); run the same command again "
                                    "to resume") from e
            except FabricError as e:  # a refusal: submit them all, the master decides
                log.warning("the master did not say which shards it finished: %s", e)
                return {}
            for item in data or []:
                try:
                    outcome = TaskOutcome.from_dict(item)
                except FabricError:
                    continue
                if outcome.state in states.FINAL_STATES:
                    known[outcome.id] = outcome
        return known
