"""ComputeNodeTransport: a compute node's side of the fabric.

It takes task batches from its own task topic into a local priority queue, runs them on
`capacity` worker threads (with `pool="process"`, each thread hands its tasks to a worker
process that a time limit or a cancel kills: node.process_pool), or hands them to a caller
through `get_task`; it sends results back in batches, heartbeats its workload on a retained
status topic, and leaves a will `dead`. On SIGINT/SIGTERM it hands back the tasks it has not
started, finishes (bounded) the ones it has, and says `offline`: nothing held is lost,
nothing is reported twice.

Results are never held back to fill a batch: the sender takes whatever finished while the
previous batch was going out (at most 2,000), so a lone result leaves at once and a stream
of tiny tasks costs one message per burst. Unless `prefetch` is given, the node asks for as
much queued work as its workers finish in `prefetch_window` seconds (see node.work_queue).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from time import perf_counter
from typing import Any, Callable, Iterable

from core import codec, states
from core.defaults import DEFAULT_CAPACITY, DEFAULT_HEARTBEAT
from core.errors import ConfigError, DecodeError, EncodeError, FabricError, TaskError
from core.mqtt import MqttSession, TlsSettings, Will
from core.protocol import (Control, NodeReport, NodeStatus, ResultBatch, TaskBatch, TaskResult,
                           TaskSpec, decode_message, result_for)
from core.topics import DEFAULT_ROOT, Topics, validate_id
from core.url import BrokerUrl, parse_broker_url
from node.builtin_tasks import with_builtins
from node.identity import claim_node_id
from node.lease_fence import LeaseFence
from node import task_context, task_output
from node.process_pool import POOLS, ProcessPool
from node.registry import TaskRegistry, default_registry
from node.work_queue import PrefetchGauge, PriorityTaskQueue

__all__ = ["ComputeNodeTransport"]

log = logging.getLogger(__name__)

_RECENT_RESULTS = 20_000      # results kept to answer a repeated delivery without re-running
_MAX_RESULT_BATCH = 2_000
# values msgpack always carries: no trial encoding needed before reporting them
_PLAIN = frozenset({type(None), bool, float, str})
_MSGPACK_INT = range(-2 ** 63, 2 ** 64)


class ComputeNodeTransport:
    """A compute node on the fabric (seed API: start, publish_status, send_result, get_task)."""

    def __init__(self, broker_host: str = "localhost", broker_port: int = 1883, *,
                 broker_url: BrokerUrl | str | None = None, node_id: str | None = None,
                 root: str = DEFAULT_ROOT, capacity: int = DEFAULT_CAPACITY,
                 prefetch: int | None = None, heartbeat: float = DEFAULT_HEARTBEAT,
                 registry: TaskRegistry | None = None,
                 codec_name: str = codec.MSGPACK, drain_timeout: float = 30.0,
                 keepalive: int = 5, tls: TlsSettings | None = None,
                 clock: Callable[[], float] = time.time, prefetch_window: float = 0.05,
                 max_prefetch: int = 1000, lambdas: Callable[[], Iterable[str]] | None = None,
                 pool: str = "thread") -> None:
        if isinstance(broker_url, str):
            broker_url = parse_broker_url(broker_url)
        self.broker = broker_url or BrokerUrl(host=broker_host, port=broker_port)
        if not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"capacity must be a positive integer, got {capacity!r}")
        if codec_name not in codec.CODECS:
            raise ConfigError(f"unknown codec {codec_name!r}")
        self.node_id = validate_id(node_id, what="node id") if node_id else claim_node_id()
        self.topics = Topics(root)
        if prefetch is not None and (not isinstance(prefetch, int) or prefetch < 0):
            raise ConfigError(f"prefetch must be 0 or more, got {prefetch!r}")
        if not prefetch_window > 0:
            raise ConfigError(f"prefetch_window must be positive, got {prefetch_window!r}")
        if pool not in POOLS:
            raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.pool = pool
        self._pool: ProcessPool | None = None  # the worker processes, once started
        self.capacity = capacity
        self.prefetch = capacity if prefetch is None else prefetch
        # None: a fixed prefetch was asked for; else the prefetch follows task durations
        self._gauge = PrefetchGauge(capacity=capacity, floor=capacity, ceiling=max_prefetch,
                                    window=prefetch_window) if prefetch is None else None
        self.heartbeat = heartbeat
        self.codec = codec_name
        self.drain_timeout = drain_timeout
        self.registry = registry if registry is not None else with_builtins(default_registry)
        self.instance = uuid.uuid4().hex[:12]
        self._clock = clock
        self._lambdas = lambdas  # the names of the lambdas it runs, for its status
        self._queue = PriorityTaskQueue()
        self._lock = threading.Lock()
        # queued or running here, each as its newest dispatch (whose attempt a result answers)
        self._held: dict[str, TaskSpec] = {}
        self._running: set[str] = set()   # taken by a worker, no result yet
        # held tasks the master cancelled after they were taken: their result is dropped
        self._cancelled: set[str] = set()
        self._cancel_events: dict[str, threading.Event] = {}  # for tasks that wait on it
        # running tasks with a time limit: id -> (monotonic deadline, task); past it the node
        # reports `timeout` at once and drops the late result (ids in _timed_out)
        self._deadlines: dict[str, tuple[float, TaskSpec]] = {}
        self._timed_out: set[str] = set()
        self._deadline_cond = threading.Condition(self._lock)
        self._watchdog: threading.Thread | None = None
        # the last results by task id, with the task they answered: a repeated delivery of
        # their dispatch gets them again, and so does a new dispatch of a task that succeeded
        # (the master lost the answer); a new dispatch after a failure runs again
        self._recent: OrderedDict[str, tuple[TaskResult, TaskSpec | None]] = OrderedDict()
        self._outbox: list[TaskResult] = []
        self._released: list[str] = []
        self._outbox_cond = threading.Condition(self._lock)
        # a graceful stop waits on this for running tasks to end and their results to be
        # handed to the session (`_sending`: batches taken from the outbox, not yet published)
        self._drained = threading.Condition(self._lock)
        self._sending = 0
        self._stop = threading.Event()
        self._accepting = True
        self._threads: list[threading.Thread] = []
        self.epoch = 0
        self.tasks_done = 0
        self.tasks_failed = 0
        self.rejected = 0
        self.duplicates = 0
        self._status = states.CONNECTED
        self._chosen: tuple[str, bool] | None = None  # publish_status's word, and busy then
        self._seq = 0         # birth sequence of the current connection
        self._will_seq = 1    # the one the next connection's will carries
        self._session = MqttSession(
            broker=self.broker, client_id=self.node_id, keepalive=keepalive, tls=tls,
            will=self._will())
        self._session.subscribe(self.topics.node_tasks(self.node_id), self._on_task_message, qos=1)
        self._fence = LeaseFence()  # replicated masters: work only from the lease holder
        self._session.subscribe(self.topics.master_lease, self._on_lease)
        self._session.on_connect(self._on_connected)

    # -- seed API ------------------------------------------------------------------------------

    def start(self, *, timeout: float = 10.0, workers: bool = True) -> None:
        """Connect, publish the birth status, start heartbeats (and workers unless told not to)."""
        if workers and self.pool == "process":  # forked before the node's own threads start
            self._pool = ProcessPool(size=self.capacity, call=self._call_in_worker,
                                     node_id=self.node_id, clock=self._clock)
            self._pool.start()
        elif workers:
            task_output.install(task_context.running)
        self._session.start(timeout=timeout)
        self._spawn(self._heartbeat_loop, "heartbeat")
        self._spawn(self._result_sender, "results")
        if workers:
            for i in range(self.capacity):
                self._spawn(self._worker_loop, f"worker-{i}")

    def publish_status(self, status: str) -> None:
        """Publish our retained status (`connected`, `ready`, `busy`, `offline`).

        The status chosen here stays (heartbeats repeat it) until the next call or until the
        node's own state changes (its workers fill up or free a slot)."""
        self._chosen = (status, self._busy())
        self._publish_status(status)

    def _publish_status(self, status: str) -> None:
        self._status = status
        self._session.publish(self.topics.node_status(self.node_id), self._status_payload(status),
                              qos=1, retain=True)

    def _busy(self) -> bool:
        return len(self._running) >= self.capacity

    def send_result(self, result: TaskResult | dict) -> None:
        """Queue a result for the master; results leave in batches, a lone one at once."""
        if isinstance(result, dict):
            result = TaskResult.from_dict({"ts": self._clock(), **result})
        held = self._held.get(result.id)
        if held is not None and not result.token:  # answer the dispatch it holds
            result = result.answering(held)
        self._finished([result])

    def _finished(self, results: list[TaskResult]) -> None:
        """Account finished tasks under one lock, then send them on.

        With nothing else queued here and nothing waiting to go, this thread sends them now
        (no hand-over to the sender thread); otherwise the sender takes them with the others
        that finish meanwhile, in one message.
        """
        held, running, recent = self._held, self._running, self._recent
        cancelled, events = self._cancelled, self._cancel_events
        dropped = False
        with self._outbox_cond:
            for i, result in enumerate(results):
                task_id = result.id
                newest = held.pop(task_id, None)
                if newest is not None and newest.token != result.token:
                    # dispatched again while it ran here: this answers the newest dispatch
                    result = results[i] = result.answering(newest)
                running.discard(task_id)
                if cancelled and task_id in cancelled:  # its late result is dropped
                    results[i] = self._cancelled_result(result)
                    if task_id in self._timed_out:  # `timeout` was reported already
                        self._timed_out.discard(task_id)
                        results[i] = None
                        dropped = True
                    continue
                if events:
                    events.pop(task_id, None)
                recent[task_id] = (result, newest)
                if result.ok:
                    self.tasks_done += 1
                else:
                    self.tasks_failed += 1
            while len(recent) > _RECENT_RESULTS:
                recent.popitem(last=False)
            if not self._accepting:
                self._drained.notify_all()
            if dropped:
                results = [r for r in results if r is not None]
            alone = not self._outbox and not self._released and not len(self._queue)
            if not alone:
                self._outbox.extend(results)
                self._outbox_cond.notify()
            elif results:
                self._sending += 1
        if alone and results:
            try:
                self._publish_results(results, [])
            finally:
                self._sent()

    def get_task(self, timeout: float | None = None) -> TaskSpec | None:
        """The most urgent queued task (None if none arrived within `timeout` seconds; the
        default, None, does not wait)."""
        task = self._queue.get(timeout)
        if task is not None:
            with self._lock:
                self._running.add(task.id)
        return task

    def _take(self, count: int, timeout: float) -> list[TaskSpec]:
        """The `count` most urgent queued tasks (fewer if fewer wait), marked running."""
        tasks = self._queue.get_many(count, timeout)
        if tasks:
            with self._lock:
                self._running.update(t.id for t in tasks)
        return tasks

    def stop(self, *, graceful: bool = True) -> None:
        """Leave the fabric: hand back unstarted tasks, finish running ones (bounded), `offline`."""
        if self._stop.is_set():
            return
        if graceful:
            self._accepting = False
            released = [t.id for t in self._queue.drain()]
            with self._outbox_cond:
                for task_id in released:
                    self._held.pop(task_id, None)
                self._released.extend(released)
                self._outbox_cond.notify()
            with self._drained:
                self._drained.wait_for(
                    lambda: not (self._running or self._outbox or self._released
                                 or self._sending),
                    timeout=self.drain_timeout)
            self._session.flush(timeout=5.0)
            try:
                self._session.publish_and_wait(self.topics.node_status(self.node_id),
                                               self._status_payload(states.OFFLINE), retain=True,
                                               timeout=5.0)
            except FabricError:
                log.warning("could not publish offline status")
        self._stop.set()
        self._queue.close()
        with self._outbox_cond:
            self._outbox_cond.notify_all()
        if self._pool is not None:  # kills what still runs, so its worker thread returns
            self._pool.close()
        if self._watchdog is not None:
            self._watchdog.join(timeout=2.0)
        for thread in self._threads:
            thread.join(timeout=2.0)
        if graceful:
            self._session.stop(timeout=2.0)
        else:
            self._session.abort()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the node stopped within `timeout` seconds. Unbounded by default, as the
        seed's `wait()` promises: a program's main thread that serves until stopped."""
        return self._stop.wait(timeout)

    @property
    def workload(self) -> int:
        return len(self._held)

    # -- execution -----------------------------------------------------------------------------

    def execute(self, task: TaskSpec) -> TaskResult:
        """Run one task by its registered name; every failure becomes a structured error."""
        fn = self.registry.get(task.name)
        if fn is None:
            return result_for(task, False, error={
                "kind": "unknown_task", "type": "UnknownTask",
                "message": f"no task named {task.name!r} on node {self.node_id}"}, ts=self._clock())
        if self._cancelled and task.id in self._cancelled:  # cancelled before it started
            return result_for(task, False, error=dict(task_context.CANCELLED_ERROR),
                              ts=self._clock())
        if not task.timeout:
            limit = self.registry.timeout(task.name)  # the task's default at registration
            if limit:
                task = dataclasses.replace(task, timeout=limit)
        if self._pool is not None:  # in a worker process: killed at its limit or on a cancel
            result, output = self._pool.run(task, cancelled=self.is_cancelled)
            result = task_output.settle(result, output, task.name)
            return result if result.ok else self._with_retry_policy(result, task)
        current = task_context.running  # what the task's context reads, on this thread
        current.task = task
        current.node = self
        current.output = None  # what it prints, once it does (node.task_output)
        if task.timeout:
            self._start_clock(task)
        try:
            result = self._call(fn, task)
        finally:
            current.task = None
            if task.timeout:
                with self._lock:
                    self._deadlines.pop(task.id, None)
        output = current.output
        if output is not None:
            current.output = None
            result = task_output.settle(result, output, task.name)
        if not result.ok:
            return self._with_retry_policy(result, task)
        return result

    def _with_retry_policy(self, result: TaskResult, task: TaskSpec) -> TaskResult:
        """A failed run carries the retry policy its task was registered with, if any: the
        master applies it when the submission did not say otherwise."""
        hint = self.registry.retry(task.name)
        if hint is None or not isinstance(result.error, dict):
            return result
        return dataclasses.replace(result, error={**result.error, "retry": hint})

    def _call_in_worker(self, task: TaskSpec) -> TaskResult:
        """`_call` in a pool's worker process (the name was checked before it was sent)."""
        fn = self.registry.get(task.name)
        if fn is None:  # registered after the worker was forked
            return result_for(task, False, error={
                "kind": "unknown_task", "type": "UnknownTask",
                "message": f"task {task.name!r} was registered after node {self.node_id}'s "
                           "worker processes started"}, ts=self._clock())
        return self._call(fn, task)

    def _call(self, fn: Callable[..., Any], task: TaskSpec) -> TaskResult:
        """Call `fn` for `task` on this thread (or in a pool's worker process)."""
        try:
            value = fn(*task.args, **task.kwargs)
            if self.codec == codec.MSGPACK and type(value) not in _PLAIN \
                    and not (type(value) is int and value in _MSGPACK_INT):
                codec.encode({"v": value}, codec.MSGPACK)  # fail here, not in the batch
            return result_for(task, True, value, ts=self._clock())
        except TaskError as e:
            return result_for(task, False, error=e.error, ts=self._clock())
        except EncodeError as e:
            return result_for(task, False, error={
                "kind": "bad_result", "type": "EncodeError", "message": str(e)}, ts=self._clock())
        except MemoryError:
            return result_for(task, False, error={
                "kind": "memory", "type": "MemoryError", "message": "out of memory"}, ts=self._clock())
        except Exception as e:
            kind = "bad_request" if isinstance(e, TypeError) and _is_call_error(e, fn) else "exception"
            return result_for(task, False, error={
                "kind": kind, "type": type(e).__name__, "message": str(e),
                "traceback": traceback.format_exc(limit=8)}, ts=self._clock())

    # -- cancellation ------------------------------------------------------------------------------

    def is_cancelled(self, task_id: str) -> bool:
        """Whether the master cancelled this held task (what a running task may ask)."""
        return task_id in self._cancelled

    def cancel_event(self, task_id: str) -> threading.Event:
        """An event set when this task is cancelled (made for tasks that wait on it)."""
        with self._lock:
            event = self._cancel_events.get(task_id)
            if event is None:
                event = self._cancel_events[task_id] = threading.Event()
                if task_id in self._cancelled or task_id not in self._held:
                    event.set()
            return event

    def cancel(self, task_ids: Iterable[str]) -> tuple[int, int]:
        """Stop tasks the master cancelled: a queued one is dropped and reported `cancelled`
        at once; a running one is told (its context) and reported `cancelled` when its
        function returns, whatever it returned (on a process pool its worker is killed). Ids not held here are ignored (finished
        already). How many were (dropped, told)."""
        wanted = {t for t in task_ids if t in self._held}
        if not wanted:
            return 0, 0
        dropped = self._queue.remove(wanted)
        with self._outbox_cond:
            gone = []
            for task in dropped:
                newest = self._held.pop(task.id, task)
                gone.append(result_for(newest, False, error=dict(task_context.CANCELLED_ERROR),
                                       ts=self._clock()))
                wanted.discard(task.id)
            wanted &= self._held.keys()  # still here: running, or taken to run
            self._cancelled |= wanted
            for task_id in wanted:
                event = self._cancel_events.get(task_id)
                if event is not None:
                    event.set()
            if gone:
                self._outbox.extend(gone)
                self._outbox_cond.notify()
        if self._pool is not None and wanted:  # a worker process is killed, not told
            self._pool.cancel(wanted)
        return len(dropped), len(wanted)

    # -- time limits -------------------------------------------------------------------------------

    def _start_clock(self, task: TaskSpec) -> None:
        """Watch a task with a time limit (the watchdog thread starts with the first one)."""
        with self._deadline_cond:
            self._deadlines[task.id] = (time.monotonic() + task.timeout, task)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_deadlines, daemon=True,
                                                  name=f"{self.node_id}-deadlines")
                self._watchdog.start()
            self._deadline_cond.notify()

    def _watch_deadlines(self) -> None:
        """Report `timeout` for each task past its limit, the moment it passes: the task is
        told to stop (its context says cancelled) and its late result is dropped."""
        with self._deadline_cond:
            while not self._stop.is_set():
                now = time.monotonic()
                late = [t for end, t in self._deadlines.values() if end <= now]
                for task in late:
                    del self._deadlines[task.id]
                    self._time_out(task)
                if late:
                    self._outbox_cond.notify()
                wait = min((end for end, _t in self._deadlines.values()), default=now + 0.5)
                self._deadline_cond.wait(min(0.5, max(0.0, wait - now)))

    def _time_out(self, task: TaskSpec) -> None:
        """`task` ran past its limit (called with the lock held)."""
        newest = self._held.get(task.id, task)
        self._timed_out.add(task.id)
        self._cancelled.add(task.id)
        event = self._cancel_events.get(task.id)
        if event is not None:
            event.set()
        self.tasks_failed += 1
        log.warning("task %s (%s) ran past its %gs limit: reported as timeout", task.id,
                    task.name, task.timeout)
        self._outbox.append(self._with_retry_policy(result_for(newest, False, error={
            "kind": "timeout", "type": "Timeout",
            "message": f"the task ran past its {task.timeout:g}s limit on node {self.node_id} "
                       "(a thread worker was told to stop; its late result is dropped)"},
            ts=self._clock()), task))

    def _cancelled_result(self, result: TaskResult) -> TaskResult:
        """The word a cancelled task's slot is free (called with the lock held)."""
        self._cancelled.discard(result.id)
        self._cancel_events.pop(result.id, None)
        return TaskResult(result.id, False, error=dict(task_context.CANCELLED_ERROR),
                          ts=result.ts, attempt=result.attempt, token=result.token)

    def _worker_loop(self) -> None:
        """Run tasks: one at a time, or, when they are tiny, the few that take a millisecond
        together (one lock round per group instead of per task). A group that turns out
        slow puts back what it has not started, so the queue can still hand it back."""
        gauge = self._gauge
        execute = self.execute
        while not self._stop.is_set():
            tasks = self._take(gauge.group if gauge is not None else 1, 0.5)
            if not tasks:
                continue
            results = []
            if gauge is None:
                results = [execute(task) for task in tasks]
            else:
                deadline = perf_counter() + gauge.GROUP_SECONDS
                for done, task in enumerate(tasks, 1):
                    started = perf_counter()
                    results.append(execute(task))
                    ended = perf_counter()
                    self.prefetch = gauge.record(ended - started)
                    if ended > deadline and done < len(tasks):
                        self._untake(tasks[done:])
                        break
            self._finished(results)
            if gauge is not None and len(self._held) > 2 * (self.capacity + self.prefetch):
                self._hand_back_excess()

    def _untake(self, tasks: list[TaskSpec]) -> None:
        """Tasks taken but not started go back to the front of the queue."""
        with self._lock:
            self._running.difference_update(t.id for t in tasks)
            if not self._accepting:
                self._drained.notify_all()
        self._queue.put_front(tasks)

    def _hand_back_excess(self) -> None:
        """Tasks turned slow: give back what waits here beyond capacity + prefetch."""
        excess = len(self._held) - self.capacity - self.prefetch
        count = self._hand_back(excess)
        if count:
            log.info("handed back %d queued tasks (prefetch now %d)", count, self.prefetch)

    def _hand_back(self, count: int) -> int:
        """Give up to `count` of the least urgent unstarted tasks back to the master."""
        tasks = self._queue.take_least_urgent(count) if count > 0 else []
        if tasks:
            with self._outbox_cond:
                for task in tasks:
                    self._held.pop(task.id, None)
                self._released.extend(task.id for task in tasks)
                self._outbox_cond.notify()
        return len(tasks)

    # -- messages in -------------------------------------------------------------------------------

    def _on_task_message(self, _topic: str, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except DecodeError as e:
            self.rejected += 1
            log.warning("rejected task message: %s", e)
            return
        if isinstance(message, TaskBatch):
            self._accept_batch(message)
        elif isinstance(message, Control):
            self._on_control(message)
        else:
            self.rejected += 1
            log.warning("rejected %r message on the task topic", message.TYPE)

    def _accept_batch(self, batch: TaskBatch) -> None:
        if not self._fence.admits(batch.epoch, batch.master):
            self.rejected += 1
            log.warning("refused %d tasks from master %r at epoch %d (the lease: %r, epoch %d)",
                        len(batch.tasks), batch.master, batch.epoch, self._fence.holder,
                        self._fence.epoch)
            with self._outbox_cond:  # handed back: a legitimate sender dispatches them again
                self._released.extend(t.id for t in batch.tasks if t.id not in self._held)
                self._outbox_cond.notify()
            return
        self.epoch = self._fence.epoch
        resend: list[TaskResult] = []
        fresh: list[TaskSpec] = []
        held = self._held
        recent = self._recent
        with self._outbox_cond:
            for task in batch.tasks:
                task_id = task.id
                if task_id in held:  # here already: one copy, answering the newest dispatch
                    self.duplicates += 1
                    held[task_id] = task
                    continue
                cached = recent.get(task_id)
                if cached is not None:
                    result, answered = cached
                    if result.token == task.token:  # the same dispatch delivered again
                        self.duplicates += 1
                        resend.append(result)
                        continue
                    if result.ok and answered is not None and answered.same_work(task):
                        self.duplicates += 1  # done here already: its answer, to this dispatch
                        result = result.answering(task)
                        recent[task_id] = (result, task)
                        resend.append(result)
                        continue
                    del recent[task_id]  # a retry after a failure: it runs again
                if not self._accepting:
                    self._released.append(task_id)
                    continue
                held[task_id] = task
                fresh.append(task)
            self._queue.put_many(fresh)
            if resend or self._released:
                self._outbox.extend(resend)
                self._outbox_cond.notify()

    def _on_lease(self, _topic: str, payload: bytes) -> None:
        if not self._fence.observe(payload):
            self.rejected += 1  # a malformed lease counts where a person looks: the status

    def _on_control(self, control: Control) -> None:
        if not self._fence.admits_control(control.epoch):
            self.rejected += 1
            log.warning("ignored %r from a master of stale epoch %d", control.command, control.epoch)
            return
        if control.command == "snapshot":
            with self._lock:
                state = {"node_id": self.node_id, "instance": self.instance,
                         "tasks_processed": self.tasks_done, "tasks_failed": self.tasks_failed,
                         "held": sorted(self._held), "running": len(self._running),
                         "rejected": self.rejected, "duplicates": self.duplicates,
                         "ts": self._clock()}
            report = NodeReport(node_id=self.node_id, request_id=control.request_id, state=state)
            self._session.publish(self.topics.results(self.node_id), report.encode(self.codec))
        elif control.command == "release":
            count = control.params.get("count")
            if type(count) is not int or count < 1:
                self.rejected += 1
                log.warning("release needs a positive count, got %r", count)
                return
            handed = self._hand_back(min(count, len(self._queue)))
            if handed:
                log.debug("handed back %d unstarted tasks to an idle node", handed)
        elif control.command == "cancel":
            ids = control.params.get("ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                self.rejected += 1
                log.warning("cancel needs a list of task ids, got %r", ids)
                return
            dropped, told = self.cancel(ids)
            if dropped or told:
                log.info("cancelled %d queued tasks; %s %d running ones", dropped,
                         "killed" if self._pool is not None else "told to stop", told)
        else:
            self.rejected += 1
            log.warning("unknown control command %r", control.command)

    # -- messages out ------------------------------------------------------------------------------

    def _result_sender(self) -> None:
        topic = self.topics.results(self.node_id)
        while True:
            with self._outbox_cond:
                while not self._outbox and not self._released and not self._stop.is_set():
                    self._outbox_cond.wait(0.5)
                if self._stop.is_set() and not self._outbox and not self._released:
                    return
                results = self._outbox[:_MAX_RESULT_BATCH]
                del self._outbox[:_MAX_RESULT_BATCH]
                released, self._released = self._released, []
                self._sending += 1
            try:
                self._publish_results(results, released, topic)
            finally:
                self._sent()

    def _sent(self) -> None:
        """A batch taken from the outbox is with the session now: a graceful stop may go on."""
        with self._lock:
            self._sending -= 1
            if not self._accepting:
                self._drained.notify_all()

    def _publish_results(self, results: list[TaskResult], released: list[str],
                         topic: str | None = None) -> None:
        prefetch = self.prefetch if self._gauge is not None else 0

        def encode(part: list[TaskResult], released: tuple[str, ...] = ()) -> bytes:
            return ResultBatch(node_id=self.node_id, instance=self.instance,
                               results=tuple(part), released=released,
                               prefetch=prefetch).encode(self.codec)

        payloads = [encode(results, tuple(released))]
        if len(payloads[0]) > codec.PAYLOAD_LIMIT and results:
            # past the broker's packet limit the broker would disconnect this node for good
            payloads = [encode([], tuple(released))] if released else []
            for part, payload in codec.encode_within(results, encode):
                if len(payload) > codec.PAYLOAD_LIMIT:  # one result too large on its own
                    big = part[0]
                    payload = encode([TaskResult(
                        big.id, False, ts=big.ts, attempt=big.attempt, token=big.token, error={
                            "kind": "payload_too_large", "type": "PayloadTooLarge",
                            "message": f"the result takes {len(payload)} bytes, more than a "
                                       f"{codec.MAX_PACKET}-byte MQTT packet"})])
                payloads.append(payload)
        try:
            for payload in payloads:
                self._session.publish(topic or self.topics.results(self.node_id), payload)
        except FabricError:
            log.exception("could not send %d results", len(results))

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if self._accepting and self._session.connected:
                busy = self._busy()
                chosen = self._chosen
                if chosen is not None and chosen[1] != busy:
                    chosen = self._chosen = None  # its own state changed since
                try:
                    self._publish_status(chosen[0] if chosen
                                         else states.BUSY if busy else states.READY)
                except FabricError:
                    log.warning("heartbeat not sent")

    def _on_connected(self, _session_present: bool) -> None:
        # this connection's will carries _will_seq: the birth says the same number, and the
        # next connection gets a will of its own, so a late will is never taken as current
        self._seq = self._will_seq
        self._will_seq += 1
        self._session.set_will(self._will())
        if self._accepting:
            self._publish_status(self._chosen[0] if self._chosen else states.READY)

    def _will(self) -> Will:
        return Will(self.topics.node_status(self.node_id),
                    self._status_payload(states.DEAD, seq=self._will_seq))

    def _status_payload(self, status: str, *, seq: int | None = None) -> bytes:
        lambdas = ",".join(sorted(self._lambdas())) if self._lambdas is not None else ""
        return NodeStatus(
            node_id=self.node_id, status=status, kind="cpython", codec=self.codec,
            capacity=self.capacity, prefetch=self.prefetch, workload=len(self._held),
            max_payload=0, instance=self.instance, tasks_done=self.tasks_done,
            tasks_failed=self.tasks_failed, rejected=self.rejected, heartbeat=self.heartbeat,
            ts=round(self._clock(), 3), tasks=",".join(self.registry.names()),
            lambdas=lambdas, seq=self._seq if seq is None else seq).encode()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=f"{self.node_id}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)


def _is_call_error(error: TypeError, fn: Callable[..., Any]) -> bool:
    """A TypeError raised by the call itself (wrong arguments), not inside the task."""
    tb = error.__traceback__
    depth = 0
    while tb is not None:
        depth += 1
        tb = tb.tb_next
    return depth <= 1
