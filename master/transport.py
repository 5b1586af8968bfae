"""MasterNodeTransport: the master's side of the fabric.

One processing thread owns the scheduler and the journal. Messages from the broker and
calls from the API land in an inbox; the loop takes everything waiting (so work arrives in
batches under load and at once when idle), applies it, and journals it in one commit.

What the master tells anyone outside its process (acknowledgements, outcomes and answers to
clients, statuses) is published only after the commit that records it. Task batches to nodes
go out before it: a task whose row is lost in a crash was never acknowledged, so its
submitter sends it again, and a result for a task the master does not know is dropped. The
journal writes themselves wait in a backlog until a turn has something else to publish, or
for at most `_JOURNAL_DELAY`: a lone task's round trip then carries no sqlite work, and an
outcome handed to a caller in this process needs no commit first, since a crash ends that
caller too. A master with a hook that gates its turns (`MasterHooks.after_commit`, as a
replicated master's) commits every turn and publishes only after the hook allowed it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

from core import codec, states
from core.defaults import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_QUEUED, DEFAULT_NODE_TIMEOUT
from core.errors import ConfigError, DecodeError, FabricError, NodeUnavailable, QueueFull, TaskRefused
from core.mqtt import MqttSession, TlsSettings, Will
from core.protocol import (DEFAULT_PRIORITY, ID_CONFLICT, QUEUE_FULL, Control, MasterStatus,
                           NodeReport, NodeStatus, OutcomeBatch, Query, QueryReply, ResultBatch,
                           Submission, SubmitReply, TaskBatch, TaskOutcome, TaskResult,
                           TaskSpec, decode_message, make_task)
from core.topics import DEFAULT_ROOT, Topics, validate_id
from core.url import BrokerUrl, parse_broker_url
from master.handles import TaskHandle
from master.hooks import HookChain, MasterHooks, NodeLostCallback
from master.journal import Journal
from master.rate_limit import RateLimit
from master.retry_policy import RetryPolicy
from master.rates import RateWindow
from master.retention import (DEFAULT_FORGET_NODES_AFTER, DEFAULT_RESULT_TTL, expiry_cutoff,
                              format_duration, gone_marks, nodes_to_forget, sweep_interval)
from master.scheduler import (COMPLETED, FINAL_STATES, STATE_CODES, STATE_NAMES, Scheduler,
                              TaskRecord, capability)

__all__ = ["MasterNodeTransport"]

log = logging.getLogger(__name__)

_MAX_INBOX_BATCH = 5000
_INLINE_TURN_TASKS = 64  # below this many active tasks a message is handled where it arrives
_JOURNAL_DELAY = 0.05    # seconds journal writes may wait for a turn that commits anyway
_MAX_WATCHED = 100_000   # tasks other clients wait on (past it they find out by asking again)
_MAX_LISTED = 10_000     # tasks one `tasks` query lists at most
_EXPIRE_BATCH = 2000     # expired tasks deleted per turn at most (more: the next turn goes on)
_COUNTERS_EVERY = 5.0    # seconds between saves of the counters when only the uptime moved
_COUNTERS = ("completed", "failed", "cancelled", "duplicates", "rejected", "rejected_messages",
             "requeued", "expired")  # what a restart keeps (meta key "counters")


class MasterNodeTransport:
    """The master (seed API: start, send_task, get_node_info, get_nodes_by_status,
    set_dead_nodes_callback, get_dead_nodes, get_results, forget_node) plus `submit`."""

    def __init__(self, broker_host: str = "localhost", broker_port: int = 1883, *,
                 broker_url: BrokerUrl | str | None = None, root: str = DEFAULT_ROOT,
                 state_dir: str | Path | None = None, master_id: str = "master",
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, max_queued: int = DEFAULT_MAX_QUEUED,
                 node_timeout: float = DEFAULT_NODE_TIMEOUT,
                 max_batch: int = 1000, status_interval: float = 1.0,
                 keepalive: int = 5, tls: TlsSettings | None = None,
                 clock: Callable[[], float] = time.monotonic, keep_results: bool = False,
                 retry: RetryPolicy | None = None, rate_limits: Iterable[RateLimit] = (),
                 result_ttl: float = DEFAULT_RESULT_TTL,
                 forget_nodes_after: float = DEFAULT_FORGET_NODES_AFTER) -> None:
        if isinstance(broker_url, str):
            broker_url = parse_broker_url(broker_url)
        self.broker = broker_url or BrokerUrl(host=broker_host, port=broker_port)
        if max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        self.master_id = validate_id(master_id, what="master id")
        self.topics = Topics(root)
        self.scheduler = Scheduler(max_attempts=max_attempts, max_queued=max_queued,
                                   node_timeout=node_timeout, retry=retry,
                                   rate_limits=rate_limits)
        journal_path = Path(state_dir) / "master.sqlite3" if state_dir else ":memory:"
        self.journal = Journal(journal_path)
        self.epoch = 0
        self.max_batch = max_batch
        self.status_interval = status_interval
        self.rejected = 0
        self._clock = clock
        # bounded state (master.retention): finished tasks expire `result_ttl` seconds after
        # they end, nodes gone `forget_nodes_after` seconds are forgotten; 0 keeps them
        self.result_ttl = result_ttl
        self.forget_nodes_after = forget_nodes_after
        self.expired = 0
        self._next_sweep = self._next_forget = 0.0
        self._gone: dict[str, float] = {}  # node id -> since when it is gone (master clock)
        self._ended_rate = RateWindow(window=60.0)
        self._uptime_base = 0.0            # seconds served by earlier runs on this journal
        self._run_started = clock()
        self._first_started = time.time()
        self._saved_counts: tuple = ()
        self._next_counters_save = 0.0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._pending = threading.Event()  # the loop thread has a turn to run
        self._in_turn = False
        self._next_liveness = self._next_status = 0.0
        self._sleep_until = 0.0  # when the loop thread wakes up next by itself
        self._thread: threading.Thread | None = None
        self._handles: dict[str, TaskHandle] = {}
        # (node, result) for get_results: kept from the first call of it (or from the start
        # with keep_results), so a master that never asks pays nothing per result
        self._results: deque[tuple[str, TaskResult]] = deque(maxlen=100_000)
        self._keep_results = keep_results
        self._rejections_logged = 0
        self._dead: list[str] = []
        self._dead_callback: NodeLostCallback | None = None  # set_dead_nodes_callback's
        # request id -> (callback, deadline on `clock`): reports are taken for a while only;
        # written and read under the lock
        self._report_waiters: dict[str, tuple[Callable[[NodeReport], None], float]] = {}
        self._query_handlers: dict[str, Callable[[dict], Any]] = {}
        # filled during one loop turn, flushed after the journal commit
        self._finished: list[tuple[TaskRecord, Any]] = []
        self._requeued: list[TaskRecord] = []
        self._outgoing: list[tuple[str, bytes, bool]] = []
        self._client_outcomes: dict[str, list[dict[str, Any]]] = {}  # wire-form outcomes
        # task id -> clients other than its submitter that wait on it (results by id)
        self._watchers: dict[str, set[str]] = {}
        self._backlog: list[Callable[[], Any]] = []  # journal writes not made yet, in order
        self._backlog_since = 0.0
        # extensions (replication, snapshots, the dead-nodes callback): master.hooks
        self._hooks = HookChain()
        self._session = MqttSession(
            broker=self.broker, client_id=f"{self.master_id}-{uuid.uuid4().hex[:6]}",
            keepalive=keepalive, tls=tls,
            will=Will(self.topics.master_status, MasterStatus(self.master_id, "dead").encode()))
        topics = self.topics
        # Statuses at QoS 0: each heartbeat replaces the last and silence is detected on its
        # own, so a thousand nodes cost the broker and this master no acknowledgement each.
        self._session.subscribe(topics.all_node_status, self._inbound("status"), qos=0)
        self._session.subscribe(topics.all_results, self._inbound("results"))
        self._session.subscribe(topics.all_submit, self._inbound("submit"))
        self._session.subscribe(topics.all_query, self._inbound("query"))

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, *, timeout: float = 10.0) -> None:
        """Restore the journal, connect, and start dispatching."""
        self._restore_counters()
        restored = self.journal.unfinished()
        for record, was_running in restored:
            record.due = self._due(record.spec)
            self.scheduler.restore(record, front=was_running)
        if restored:
            log.info("restored %d unfinished tasks from the journal", len(restored))
        self._session.start(timeout=timeout)
        self._thread = threading.Thread(target=self._run, name="master-loop", daemon=True)
        self._thread.start()

    def stop(self, *, timeout: float = 5.0, quiet: bool = False) -> None:
        """Stop dispatching, say `offline`, disconnect. Queued work stays in the journal.
        `quiet`: say nothing (a master replaced by another must not overwrite its status)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._pending.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            if not quiet:  # a master replaced by another leaves the journal to the new one
                self._save_counters(self._clock(), force=True)
            self._commit()
            try:
                if not quiet:
                    self._session.publish_and_wait(self.topics.master_status,
                                                   self._master_status("offline").encode(),
                                                   retain=True, timeout=2.0)
            except FabricError:
                pass
            self._session.stop(timeout=timeout)
            self.journal.close()

    def __enter__(self) -> "MasterNodeTransport":
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- seed API ------------------------------------------------------------------------------

    def send_task(self, node_id: str, task_data: dict, priority: int = DEFAULT_PRIORITY) -> str:
        """Send a task to one node (`{"name": ..., "args": [...], "kwargs": {...}}`); its id.

        The node must be known and alive (else NodeUnavailable) and offer the task's name
        (else ConfigError). The task is journalled like any other and waits for that node
        while it lives; if the node dies before running it, the pin is dropped and it goes
        to another node that offers it.
        """
        if not isinstance(task_data, dict) or not isinstance(task_data.get("name"), str):
            raise ConfigError("task_data must be a dict with a 'name'")
        spec = self._spec(task_data["name"], task_data.get("args", []),
                          task_data.get("kwargs", {}), priority, task_data.get("id"))
        with self._lock:
            node = self.scheduler.nodes.get(node_id)
            if node is None or not node.alive:
                known = sorted(n.node_id for n in self.scheduler.nodes.values() if n.alive)
                raise NodeUnavailable(
                    f"node {node_id!r} is {'not known' if node is None else node.status} "
                    f"(live nodes: {', '.join(known) or 'none'})")
            need = capability(spec)
            if not node.offers(need):
                raise ConfigError(f"node {node_id!r} does not run {need!r}")
        handle = self._submit_local([spec], pinned=node_id,
                                    chosen_ids=task_data.get("id") is not None)[0]
        if handle.done():
            handle.outcome(timeout=0)  # refused at once (full queue, id bound elsewhere): raise
        return spec.id

    def submit(self, name: str, args: Iterable[Any] = (), kwargs: dict | None = None, *,
               priority: int = DEFAULT_PRIORITY, task_id: str | None = None,
               max_attempts: int = 0, timeout: float = 0.0) -> TaskHandle:
        """Queue a task for whichever node the scheduler picks; await it with the handle.
        A `task_id` of your own names this work: binding it to other work is refused.
        `timeout`: seconds one run may take on its node before it ends `timeout` (0: none)."""
        return self._submit_local([self._spec(name, args, kwargs, priority, task_id,
                                              max_attempts, timeout)],
                                  chosen_ids=task_id is not None)[0]

    def submit_many(self, calls: Iterable[tuple[str, list, dict, int]]) -> list[TaskHandle]:
        """Queue many (name, args, kwargs, priority) calls at once; one handle each."""
        return self._submit_local([self._spec(n, a, k, p, None) for n, a, k, p in calls])

    def dispatch_lambda(self, lambda_data: dict, *, priority: int = DEFAULT_PRIORITY) -> TaskHandle:
        """Run a named lambda (`name`, `event`, `env`, `timeout`, `memory`) on some node."""
        return self.submit("lambda", kwargs=lambda_data, priority=priority)

    def get_node_info(self, node_id: str | None = None) -> dict | list[dict] | None:
        with self._lock:
            if node_id is not None:
                node = self.scheduler.nodes.get(node_id)
                return node.info() if node else None
            return [n.info() for n in self.scheduler.nodes.values()]

    def get_nodes_by_status(self, status: str = states.READY) -> list[str]:
        with self._lock:
            return [n.node_id for n in self.scheduler.nodes.values() if n.status == status]

    def set_dead_nodes_callback(self, cb: Callable[[list[str]], None]) -> None:
        """`cb(node_ids)` is called (on the master's loop thread) when nodes are found dead;
        it replaces the callback set before."""
        hooks, self._dead_callback = self._dead_callback, NodeLostCallback(cb)
        self._hooks.replace(hooks, self._dead_callback)

    def add_hooks(self, hooks: MasterHooks) -> None:
        """Call `hooks` from now on, after those added before (see master.hooks)."""
        self._hooks.add(hooks)

    def remove_hooks(self, hooks: MasterHooks) -> None:
        """Stop calling `hooks` (not added: nothing happens)."""
        self._hooks.remove(hooks)

    def get_dead_nodes(self, disposable: bool = False) -> list[str]:
        with self._lock:
            out = list(self._dead)
            if disposable:
                self._dead.clear()
            return out

    def get_results(self, node_id_dict: Iterable[str] | None = None,
                    disposable: bool = False) -> list[dict]:
        """Results received (the last 100,000), optionally only from the given nodes.

        They are kept from the first call on (or from the start with `keep_results=True`),
        so a master nobody asks keeps none."""
        with self._lock:
            self._keep_results = True
            wanted = set(node_id_dict) if node_id_dict is not None else None
            out = [{"task_id": r.id, "node_id": node_id, "ok": r.ok, "value": r.value,
                    "error": r.error, "ts": r.ts}
                   for node_id, r in self._results if wanted is None or node_id in wanted]
            if disposable:
                if wanted is None:
                    self._results.clear()
                else:
                    keep = [e for e in self._results if e[0] not in wanted]
                    self._results.clear()
                    self._results.extend(keep)
            return out

    def forget_node(self, node_id: str) -> None:
        """Drop a node from the registry (its tasks go back to the queue) and clear its status."""
        with self._lock:
            requeued = self.scheduler.forget(node_id)
            self._requeued.extend(self.scheduler.tasks[t] for t in requeued
                                  if t in self.scheduler.tasks)
        self._session.publish(self.topics.node_status(node_id), b"", retain=True)
        self._wake()

    # -- more API --------------------------------------------------------------------------------

    def status(self) -> dict:
        with self._lock:
            return self._master_status("running").to_dict()

    def outcomes(self, task_ids: Iterable[str]) -> dict[str, TaskOutcome]:
        with self._lock:
            return self._outcomes(list(task_ids))

    def task_info(self, task_id: str) -> dict | None:
        """Everything known about one task (its call, state, and each attempt with node,
        times and error); None if no task has that id."""
        with self._lock:
            return self._task_info({"id": task_id})

    def tasks(self, *, state: str | None = None, name: str | None = None,
              limit: int = 50) -> list[dict]:
        """The latest tasks, newest first, optionally of one state and/or name."""
        with self._lock:
            return self._list_tasks({"state": state, "name": name, "limit": limit})

    def cancel(self, task_ids: Iterable[str]) -> list[dict]:
        """Cancel tasks: a queued one never starts, a running one is stopped on its node;
        either ends `cancelled` (once). One verdict per id: what it `was`, its `state` now."""
        with self._lock:
            verdicts = self._cancel({"ids": list(task_ids)}, who="this master's process")
        self._wake()
        return verdicts

    def broadcast_control(self, command: str, params: dict | None = None,
                          on_report: Callable[[NodeReport], None] | None = None, *,
                          report_window: float = 30.0) -> str:
        """Send a control message to every live node; reports arriving within
        `report_window` seconds go to `on_report` (on the master's loop thread)."""
        request_id = uuid.uuid4().hex[:12]
        with self._lock:  # the loop reads and expires the waiters under it, in its turn
            if on_report is not None:
                self._report_waiters[request_id] = (on_report, self._clock() + report_window)
            nodes = [n for n in self.scheduler.nodes.values() if n.alive]
        for node in nodes:
            message = Control(command=command, request_id=request_id, params=params or {},
                              epoch=self.epoch)
            self._session.publish(self.topics.node_tasks(node.node_id), message.encode(node.codec))
        return request_id

    def adopt(self, node_id: str, task_ids: Iterable[str]) -> int:
        """After a take-over: queued tasks that a node reports holding stay in flight on it
        instead of being dispatched again. How many were adopted."""
        with self._lock:
            records = self.scheduler.adopt(node_id, task_ids)
            self._journal_later(partial(self.journal.dispatched, records))
        self._wake()
        return len(records)

    def add_query(self, what: str, handler: Callable[[dict], Any]) -> None:
        """Answer `Query(what=...)` from clients with `handler(params)` (runs on the loop)."""
        self._query_handlers[what] = handler

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        self._session.publish(topic, payload, qos=qos, retain=retain)

    # -- internals: intake -----------------------------------------------------------------------

    def _spec(self, name: str, args: Iterable[Any], kwargs: dict | None, priority: int,
              task_id: str | None, max_attempts: int = 0, timeout: float = 0.0) -> TaskSpec:
        return make_task(name, args, kwargs, priority=priority, task_id=task_id,
                         max_attempts=max_attempts, timeout=timeout)

    def _submit_local(self, specs: list[TaskSpec], *, pinned: str = "",
                      chosen_ids: bool = False) -> list[TaskHandle]:
        """Queue tasks made in this process. Ids chosen by a caller (`chosen_ids`) are checked
        against the work they are bound to already; fresh ids are unique by construction."""
        handles = [TaskHandle(s.id) for s in specs]
        with self._lock:
            records = []
            bound = self._bound_work(specs) if chosen_ids else {}
            for spec, handle in zip(specs, handles):
                earlier = bound.get(spec.id)
                if earlier is not None and not earlier.same_work(spec):
                    handle.reject(TaskRefused(_conflict(spec.id)))
                    continue
                try:
                    record = self.scheduler.submit(spec, pinned=pinned, due=self._due(spec))
                except QueueFull as e:
                    handle.reject(e)
                    continue
                self._handles[spec.id] = handle
                if record is not None:
                    records.append(record)
            self._journal_later(partial(self.journal.submitted, records))
        self._wake()
        return handles

    def _inbound(self, kind: str) -> Callable[[str, bytes], None]:
        put = self._inbox.put
        turn_now = self._turn_now

        def handler(topic: str, payload: bytes) -> None:
            put((kind, topic, payload))
            turn_now()
        return handler

    def _wake(self) -> None:
        self._turn_now()

    def _due(self, spec: TaskSpec) -> float:
        """The scheduler's time (this master's clock) for the task's wall-clock start time;
        0 if it may start now."""
        if not spec.not_before:
            return 0.0
        ahead = spec.not_before - time.time()
        return self._clock() + ahead if ahead > 0 else 0.0

    # -- internals: the loop ---------------------------------------------------------------------

    def _turn_now(self) -> None:
        """Run a turn in this thread if no other thread is in one, else leave it to the loop.

        While few tasks are active, the thread that brings a message (the MQTT thread, or a
        caller of submit) handles it at once: handing it to the loop thread would cost two
        thread switches, a good part of a lone task's round trip. A busy master leaves it to
        the loop thread, where what arrives meanwhile is handled in one turn (bigger batches,
        fewer commits). Whoever holds the lock drains everything queued so far, so the order
        of arrival is kept. A master whose hooks gate its turns (a replicated one waits for its
        standbys in each) keeps them on the loop thread."""
        if (len(self.scheduler.tasks) < _INLINE_TURN_TASKS and not self._hooks.gated
                and not self._stop.is_set() and self._lock.acquire(blocking=False)):
            try:
                if not self._in_turn:
                    self._turn()
                    return
            finally:
                self._lock.release()
        self._pending.set()

    def _run(self) -> None:
        pending = self._pending
        wait = 0.1
        while not self._stop.is_set():
            pending.wait(wait)  # timers (liveness, status) run at least every 0.1 s
            pending.clear()
            with self._lock:
                self._turn()
                # and sooner when a delayed task falls due or a rate-limited one may start
                now = self._clock()
                wake = self.scheduler.next_wake(now)
                wait = 0.1 if wake is None else min(0.1, max(0.001, wake - now))
                self._sleep_until = now + wait

    def _turn(self) -> None:
        """Apply what arrived, assign, journal, publish. Called with the lock held."""
        inbox = self._inbox
        items = []
        while len(items) < _MAX_INBOX_BATCH:
            try:
                items.append(inbox.get_nowait())
            except queue.Empty:
                break
        else:
            self._pending.set()  # more than one turn's worth: the loop takes the rest
        self._in_turn = True
        try:
            now = self._clock()
            for item in items:
                self._apply(item, now)
            liveness = now >= self._next_liveness
            if liveness:
                self._check_liveness(now)
                self._next_liveness = now + 0.1
            if now >= self._next_sweep:
                self._retain(now)
            dispatching = self._hooks.before_dispatch(self)
            assignments = self.scheduler.assign(now=now) if dispatching else {}
            wake = self.scheduler.next_wake(now)
            if wake is not None and wake < self._sleep_until - 0.001:
                self._pending.set()  # the loop thread sleeps past it: wake it to plan again
            if self.scheduler.unknown_failed:
                self._note_failed(self.scheduler.unknown_failed)
                self.scheduler.unknown_failed = []
            self._journal_turn(assignments)
            work = self._task_batches(assignments)
            if liveness and dispatching:
                work.extend(self._steal_requests(now))
            self._settle_finished()
            if now >= self._next_status:
                self._outgoing.append((self.topics.master_status,
                                       self._master_status("running").encode(), True))
                self._next_status = now + self.status_interval
            if not self._hooks.gated:  # on its own: work first, the rest after the commit
                self._send(work)
                if self._outgoing or (self._backlog
                                      and now - self._backlog_since >= _JOURNAL_DELAY):
                    self._commit()
                    self._send(self._outgoing)
            else:
                self._commit()
                self._outgoing[:0] = work
                if self._hooks.after_commit(self):
                    self._send(self._outgoing)
        except Exception:  # the loop must survive any bug in one message's handling
            log.exception("master loop turn failed")
        finally:
            self._in_turn = False

    def _apply(self, item: tuple[str, str, bytes], now: float) -> None:
        kind, topic, payload = item
        try:
            if kind == "status":
                self._on_status(topic, payload, now)
            elif kind == "results":
                self._on_results(topic, payload, now)
            elif kind == "submit":
                self._on_submit(topic, payload)
            elif kind == "query":
                self._on_query(topic, payload)
        except FabricError as e:  # malformed, or nothing that can be answered: this one only
            self.rejected += 1
            log.warning("rejected message on %s: %s", topic, e)
        except Exception:  # a bug in one message's handling costs that message, not the turn
            self.rejected += 1
            log.exception("message on %s could not be handled", topic)

    def _on_status(self, topic: str, payload: bytes, now: float) -> None:
        if not payload:
            return  # a cleared retained status
        status = decode_message(payload)
        node_id = self.topics.level(topic, 1)
        if not isinstance(status, NodeStatus) or status.node_id != node_id:
            raise DecodeError(f"status for {node_id!r} is not a status message of that node")
        known = self.scheduler.nodes.get(node_id)
        was_alive = known is not None and known.alive
        requeued, failed = self.scheduler.node_status(status, now)
        self._note_requeued(requeued)
        self._note_failed(failed)
        if status.status == states.DEAD and (was_alive or known is None):
            self._node_dead(node_id)
        elif status.workload == 0 and status.status in (states.READY, states.BUSY):
            node = self.scheduler.nodes[node_id]
            if node.in_flight:  # it holds nothing, yet some sent to it are unanswered
                lost = self.scheduler.stranded(node_id, now, age=max(2.0 * node.heartbeat, 1.0))
                if lost:
                    log.info("node %s holds none of %d tasks sent to it: sending them again",
                             node_id, lost)

    def _on_results(self, topic: str, payload: bytes, now: float) -> None:
        message = decode_message(payload)
        node_id = self.topics.level(topic, 1)
        if isinstance(message, NodeReport):
            if message.node_id == node_id:
                self._hooks.node_report(self, message)
                waiter = self._report_waiters.get(message.request_id)
                if waiter is not None and now <= waiter[1]:
                    waiter[0](message)
            return
        if not isinstance(message, ResultBatch) or message.node_id != node_id:
            raise DecodeError(f"results on {topic} are not a result batch of node {node_id!r}")
        scheduler = self.scheduler
        scheduler.heard_from(node_id, now)
        if message.prefetch:  # before the releases: what the node holds is measured by it
            scheduler.set_prefetch(node_id, message.prefetch)
        completed, others = scheduler.complete_many(node_id, message.results)
        self._finished.extend([(record, result.value) for record, result in completed])
        if self._keep_results:
            self._results.extend([(node_id, result) for _record, result in completed])
        for result in others:
            verdict, record = scheduler.result(node_id, result, now=now)
            if verdict == "duplicate":
                continue
            if verdict == "rejected":
                self._log_rejected(node_id, result, record)
                continue
            if self._keep_results:
                self._results.append((node_id, result))
            if verdict != states.COMPLETED and record is not None:
                self._stamp_errors([record], now)
            if verdict == states.COMPLETED or verdict == states.FAILED:
                self._finished.append((record, result.value))
            elif record is not None:
                self._requeued.append(record)
        if message.released:
            self._note_requeued(scheduler.release(node_id, message.released))

    def _log_rejected(self, node_id: str, result: TaskResult, record: TaskRecord | None) -> None:
        """A node's word about a dispatch it was not given: counted, and logged (the first
        hundred, then every thousandth, so a flood cannot fill the log)."""
        self._rejections_logged += 1
        n = self._rejections_logged
        if n <= 100 or n % 1000 == 0:
            why = ("no such task is active" if record is None
                   else f"its current attempt {record.dispatch} went to {record.sent_to or 'no node'}")
            log.warning("rejected a result from node %s for task %s attempt %d (%s; %d rejected "
                        "so far)", node_id, result.id, result.attempt, why, n)

    def _bound_work(self, specs: list[TaskSpec]) -> dict[str, TaskSpec]:
        """The work already bound to these ids (active or journalled), to refuse an id's
        reuse for other work."""
        if not specs:
            return {}
        active = self.scheduler.tasks
        out = {s.id: active[s.id].spec for s in specs if s.id in active}
        rest = [s.id for s in specs if s.id not in out]
        if rest:
            self._write_backlog()
            out.update(self.journal.calls(rest))
        return out

    def _on_submit(self, topic: str, payload: bytes) -> None:
        message = decode_message(payload)
        self._write_backlog()  # the journal is read below: it must hold every earlier write
        client_id = self.topics.level(topic, 1)
        if not isinstance(message, Submission) or message.client_id != client_id:
            raise DecodeError(f"submission on {topic} is not from client {client_id!r}")
        scheduler = self.scheduler
        active = scheduler.tasks
        room = scheduler.room
        accepted: list[str] = []
        rejected: list[tuple[str, str]] = []
        fresh: list[TaskRecord] = []
        seen: set[str] = set()
        seen: dict[str, TaskSpec] = {}
        for spec in message.tasks:
            task_id = spec.id
            record = active.get(task_id)
            earlier = record.spec if record is not None else seen.get(task_id)
            if earlier is not None:  # queued or running already: keep it once
                if not earlier.same_work(spec):
                    rejected.append((task_id, _conflict(task_id)))
                    continue
                if record is not None:
                    record.client = client_id  # the latest submitter is the one still waiting
                accepted.append(task_id)
                continue
            if len(fresh) >= room:
                rejected.append((task_id, f"{QUEUE_FULL}: queue is full ({scheduler.max_queued} "
                                          "tasks waiting)"))
                continue
            seen[task_id] = spec
            fresh.append(TaskRecord(spec=spec, client=client_id,
                                    due=self._due(spec) if spec.not_before else 0.0))
            accepted.append(task_id)
        if not self.journal.submitted_if_new(fresh):
            # some ids are journalled already: a resend after a lost reply or a master restart
            known = self.journal.outcomes(r.id for r in fresh)
            bound = self.journal.calls(i for i in known)
            redo = []
            for record in fresh:
                outcome = known.get(record.id)
                earlier = bound.get(record.id)
                if earlier is not None and not earlier.same_work(record.spec):
                    accepted.remove(record.id)
                    rejected.append((record.id, _conflict(record.id)))
                elif outcome is None:
                    redo.append(record)
                elif outcome.state in FINAL_STATES:  # finished: answer again
                    self._client_outcomes.setdefault(client_id, []).append(outcome.to_dict())
            self.journal.submitted(redo)
            fresh = redo
        scheduler.admit(fresh)
        full = [task_id for task_id, reason in rejected if reason.startswith(QUEUE_FULL)]
        if full:  # a full queue refuses new work, not the resend of a finished task
            known = self.journal.outcomes(full)
            done = {i for i, o in known.items() if o.state in FINAL_STATES}
            bound = self.journal.calls(done)
            specs = {s.id: s for s in message.tasks}
            done = {i for i in done if bound[i].same_work(specs[i])}
            for task_id in done:
                accepted.append(task_id)
                self._client_outcomes.setdefault(client_id, []).append(known[task_id].to_dict())
            rejected = [r for r in rejected if r[0] not in done]
        reply = SubmitReply(request_id=message.request_id, accepted=tuple(accepted),
                            rejected=tuple(rejected))
        self._outgoing.append((self.topics.client(client_id), reply.encode(), False))

    def _on_query(self, topic: str, payload: bytes) -> None:
        message = decode_message(payload)
        client_id = self.topics.level(topic, 1)
        if not isinstance(message, Query) or message.client_id != client_id:
            raise DecodeError(f"query on {topic} is not from client {client_id!r}")
        try:
            data = self._answer(message)
            payload = QueryReply(request_id=message.request_id, ok=True, data=data).encode()
        except FabricError as e:  # also an answer that cannot be encoded
            payload = QueryReply(request_id=message.request_id, ok=False, error=str(e)).encode()
        except Exception as e:  # a bug: the asker hears of it at once instead of timing out
            log.exception("query %r failed", message.what)
            payload = QueryReply(request_id=message.request_id, ok=False,
                                 error=f"the master failed to answer {message.what!r}: "
                                       f"{type(e).__name__}: {e}").encode()
        self._outgoing.append((self.topics.client(client_id), payload, False))

    def _answer(self, query: Query) -> Any:
        if query.what == "nodes":
            return [n.info() for n in self.scheduler.nodes.values()]
        if query.what == "status":
            return self._master_status("running").to_dict()
        if query.what == "outcomes":
            ids = query.params.get("ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ConfigError("outcomes query needs params.ids: a list of task ids")
            outcomes = self._outcomes(ids)
            if query.params.get("watch") is True:
                self._watch(query.client_id, outcomes)
            return [o.to_dict() for o in outcomes.values()]
        if query.what == "task":
            return self._task_info(query.params)
        if query.what == "tasks":
            return self._list_tasks(query.params)
        if query.what == "cancel":
            return self._cancel(query.params, who=f"client {query.client_id}")
        handler = self._query_handlers.get(query.what)
        if handler is None:
            raise ConfigError(f"unknown query {query.what!r}")
        return handler(query.params)

    def _outcomes(self, ids: list[str]) -> dict[str, TaskOutcome]:
        out: dict[str, TaskOutcome] = {}
        missing = []
        for task_id in ids:
            record = self.scheduler.tasks.get(task_id)
            if record is not None:
                out[task_id] = TaskOutcome(id=task_id, state=states.PENDING, node_id=record.node,
                                           attempts=record.attempts)
            else:
                missing.append(task_id)
        if missing:
            self._commit()
            found = self.journal.outcomes(missing)
            for task_id in missing:
                out[task_id] = found.get(task_id) or self._unknown(task_id)
        return out

    def _unknown(self, task_id: str) -> TaskOutcome:
        """The outcome of an id the journal does not hold, saying why that can be."""
        kept = ("" if self.result_ttl <= 0 else
                f", or it ended more than {format_duration(self.result_ttl)} ago and expired "
                "(finished tasks are kept for the master's --result-ttl)")
        return TaskOutcome(id=task_id, state=states.UNKNOWN, error={
            "kind": "unknown", "message": f"no task with id {task_id!r} is known to the master: "
                                          f"it was never submitted{kept}"})

    def _watch(self, client_id: str, outcomes: dict[str, TaskOutcome]) -> None:
        """Push the outcome of each still-pending task to `client_id` too when it ends."""
        watchers = self._watchers
        active = self.scheduler.tasks
        for task_id, outcome in outcomes.items():
            if outcome.state != states.PENDING or task_id not in active:
                continue
            if active[task_id].client == client_id:
                continue  # its submitter is told anyway
            clients = watchers.get(task_id)
            if clients is None:
                if len(watchers) >= _MAX_WATCHED:
                    continue
                clients = watchers[task_id] = set()
            clients.add(client_id)

    def _task_info(self, params: dict) -> dict | None:
        task_id = _task_id(params.get("id"))
        self._commit()  # the journal is read below: it must hold every write so far
        view = self.journal.task(task_id)
        if view is None:
            return None
        record = self.scheduler.tasks.get(task_id)
        if record is not None:  # active: the scheduler knows its state first-hand
            view["state"] = STATE_NAMES[record.state]
            view["node_id"] = record.node
            view["attempts"] = record.attempts
            view["dispatches"] = record.dispatch
        return view

    def _list_tasks(self, params: dict) -> list[dict]:
        state, name, limit = params.get("state"), params.get("name"), params.get("limit", 50)
        if state is not None and state not in STATE_CODES:
            raise ConfigError(f"unknown task state {state!r} (use one of "
                              f"{', '.join(STATE_CODES)})")
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError(f"a task name must be a non-empty string, got {name!r}")
        if type(limit) is not int or not 1 <= limit <= _MAX_LISTED:
            raise ConfigError(f"limit must be an integer 1-{_MAX_LISTED}, got {limit!r}")
        self._commit()
        return self.journal.tasks(state=state, name=name, limit=limit)

    def _cancel(self, params: dict, *, who: str) -> list[dict]:
        """Cancel the given ids (called on the loop, or under its lock): each active one ends
        `cancelled` now; a running one's node is told to stop it."""
        ids = params.get("ids")
        if not isinstance(ids, list) or not ids:
            raise ConfigError("cancel needs params.ids: a non-empty list of task ids")
        ids = [_task_id(i) for i in ids]
        scheduler = self.scheduler
        now = self._clock()
        verdicts = []
        stop: dict[str, list[str]] = {}
        missing = []
        for task_id in ids:
            was, record = scheduler.cancel(task_id, f"cancelled by {who}", now)
            if record is None:
                missing.append(task_id)
                verdicts.append({"id": task_id})
                continue
            self._stamp_errors([record], now)
            self._finished.append((record, None))
            verdicts.append({"id": task_id, "was": was, "state": states.CANCELLED,
                             "node_id": record.node if was == states.RUNNING else ""})
            if was == states.RUNNING and record.node:
                stop.setdefault(record.node, []).append(task_id)
        if missing:  # not active: finished, or never known; nothing changes
            self._commit()
            found = self.journal.outcomes(missing)
            for verdict in verdicts:
                if "was" not in verdict:
                    outcome = found.get(verdict["id"])
                    state = outcome.state if outcome is not None else states.UNKNOWN
                    verdict.update(was=state, state=state, node_id=outcome.node_id
                                   if outcome is not None else "")
        for node_id, task_ids in stop.items():
            node = scheduler.nodes.get(node_id)
            if node is None or not node.alive:
                continue
            control = Control(command="cancel", params={"ids": task_ids}, epoch=self.epoch)
            self._outgoing.append((self.topics.node_tasks(node_id), control.encode(node.codec),
                                   False))
        if stop or len(missing) != len(ids):
            log.info("%s cancelled %d tasks (%d running)", who, len(ids) - len(missing),
                     sum(len(t) for t in stop.values()))
        return verdicts

    def _check_liveness(self, now: float) -> None:
        if self._report_waiters:
            for request_id in [r for r, (_cb, end) in self._report_waiters.items() if end < now]:
                del self._report_waiters[request_id]
        for node_id in self.scheduler.silent(now):
            log.warning("node %s missed its heartbeats: marking it dead", node_id)
            requeued, failed = self.scheduler.lose_node(node_id, f"node {node_id} stopped heartbeating")
            self._note_requeued(requeued)
            self._note_failed(failed)
            node = self.scheduler.nodes[node_id]
            dead = NodeStatus(node_id=node_id, status=states.DEAD, kind=node.kind, codec=node.codec,
                              capacity=node.capacity, instance=node.instance,
                              tasks_done=node.tasks_done, tasks_failed=node.tasks_failed,
                              rejected=node.rejected, heartbeat=node.heartbeat,
                              ts=node.reported_ts, tasks=node.tasks_text or "",
                              lambdas=node.lambdas_text, seq=node.seq)
            self._outgoing.append((self.topics.node_status(node_id), dead.encode(), True))
            self._node_dead(node_id)

    def _node_dead(self, node_id: str) -> None:
        if node_id not in self._dead:
            self._dead.append(node_id)
        self._hooks.node_lost(self, [node_id])

    def _note_requeued(self, task_ids: list[str]) -> None:
        tasks = self.scheduler.tasks
        records = [tasks[t] for t in task_ids if t in tasks]
        self._stamp_errors(records, self._clock())
        self._requeued.extend(records)

    def _note_failed(self, records: list[TaskRecord]) -> None:
        self._stamp_errors(records, self._clock())
        self._finished.extend((r, None) for r in records)

    def _stamp_errors(self, records: list[TaskRecord], now: float) -> None:
        """Give a task's newest error the wall-clock times of its attempt (when it was sent,
        when it ended), for `master-node task`; errors stamped already are left alone."""
        wall = None
        for record in records:
            errors = record.errors
            if not errors or "ended" in errors[-1]:
                continue
            if wall is None:
                wall = time.time()
            error = errors[-1]
            error["ended"] = round(wall, 3)
            if record.sent > 0 and "node_id" in error:
                error["started"] = round(wall - max(0.0, now - record.sent), 3)

    # -- internals: bounded state (master.retention) ----------------------------------------------

    def _retain(self, now: float) -> None:
        """Delete tasks that ended more than the TTL ago (a bounded batch per turn), hand the
        pages they held back now and then, and forget nodes gone for too long."""
        self._next_sweep = now + sweep_interval(self.result_ttl or 10.0)
        cutoff = expiry_cutoff(time.time(), self.result_ttl)
        if cutoff is not None:
            self._write_backlog()  # in order: a task reopened since is not deleted
            gone = self.journal.expire(cutoff, limit=_EXPIRE_BATCH)
            if gone:
                self.expired += gone
                if gone >= _EXPIRE_BATCH:
                    self._next_sweep = now  # more to go: the next turn goes on
            self.journal.reclaim()
        if self.forget_nodes_after > 0 and now >= self._next_forget:
            self._next_forget = now + sweep_interval(self.forget_nodes_after)
            self._forget_gone(now)

    def _forget_gone(self, now: float) -> None:
        """Forget nodes dead or offline for `forget_nodes_after` and clear their retained
        status, so viewers stop showing them. A node that offers what queued tasks wait for
        is kept: they run when it comes back."""
        scheduler = self.scheduler
        nodes = scheduler.nodes
        self._gone = gone_marks(self._gone, ((i, n.alive) for i, n in nodes.items()), now)
        for node_id in nodes_to_forget(self._gone, now, self.forget_nodes_after):
            node = nodes[node_id]
            if any(node.offers(need) for need in scheduler.waiting):
                continue
            requeued = scheduler.forget(node_id)
            self._requeued.extend(scheduler.tasks[t] for t in requeued if t in scheduler.tasks)
            del self._gone[node_id]
            if node_id in self._dead:
                self._dead.remove(node_id)
            self._outgoing.append((self.topics.node_status(node_id), b"", True))
            log.info("forgot node %s: %s for more than %s", node_id, node.status,
                     format_duration(self.forget_nodes_after))

    def _uptime(self, now: float) -> float:
        """Seconds this journal's master has served, over every run."""
        return self._uptime_base + max(0.0, now - self._run_started)

    def _restore_counters(self) -> None:
        """Counters and uptime as the last run left them (meta key "counters")."""
        self._run_started = self._clock()
        text = self.journal.meta("counters")
        if text is None:
            return
        try:
            saved = json.loads(text)
            counts = [int(saved.get(name, 0)) for name in _COUNTERS]
            uptime = float(saved.get("uptime", 0.0))
            started = float(saved.get("started", self._first_started))
        except (ValueError, TypeError, AttributeError):
            log.warning("journal counters unreadable, starting from zero: %r", text[:200])
            return
        s = self.scheduler
        (s.completed, s.failed, s.cancelled, s.duplicates, s.rejected, self.rejected,
         s.requeued, self.expired) = counts
        self._uptime_base, self._first_started = uptime, started
        self._saved_counts = tuple(counts)

    def _save_counters(self, now: float, *, force: bool = False) -> None:
        """Journal the counters (with the turn's other writes, so a restart finds them as the
        tasks they count) when they changed, and every few seconds for the uptime."""
        s = self.scheduler
        counts = (s.completed, s.failed, s.cancelled, s.duplicates, s.rejected, self.rejected,
                  s.requeued, self.expired)
        if counts == self._saved_counts and now < self._next_counters_save and not force:
            return
        self._saved_counts = counts
        self._next_counters_save = now + _COUNTERS_EVERY
        saved = dict(zip(_COUNTERS, counts), uptime=round(self._uptime(now), 3),
                     started=self._first_started)
        self._journal_later(partial(self.journal.set_meta, "counters", json.dumps(saved)))

    # -- internals: journal and publication ------------------------------------------------------

    def _journal_later(self, write: Callable[[], Any]) -> None:
        """Queue a journal write; the backlog is written in order by `_write_backlog`."""
        if not self._backlog:
            self._backlog_since = self._clock()
        self._backlog.append(write)

    def _write_backlog(self) -> None:
        for write in self._backlog:
            write()
        self._backlog.clear()

    def _commit(self) -> None:
        self._write_backlog()
        self.journal.commit()

    def _journal_turn(self, assignments: dict[str, list[TaskRecord]]) -> None:
        journal = self.journal
        if self._requeued:
            self._journal_later(partial(journal.requeued, self._requeued[:]))
            later = [r for r in self._requeued if r.due]
            if later:  # waiting out a backoff: its wall-clock end, for a restarted master
                now, wall = self._clock(), time.time()
                self._journal_later(partial(journal.delayed,
                                            [(r, wall + r.due - now) for r in later]))
            self._requeued.clear()
        if assignments:
            self._journal_later(partial(
                journal.dispatched, [r for records in assignments.values() for r in records],
                time.time()))
        if self._finished:
            self._journal_later(partial(journal.finished, self._finished[:], time.time()))
        self._save_counters(self._clock())

    def _task_batches(self, assignments: dict[str, list[TaskRecord]]
                      ) -> list[tuple[str, bytes, bool]]:
        """The turn's assignments as (topic, payload, retain) task batches, within each node's
        payload limit (the broker would hang up on the master over a bigger packet)."""
        work = []
        for node_id, records in assignments.items():
            node = self.scheduler.nodes[node_id]
            topic = self.topics.node_tasks(node_id)

            def encode(batch: list[TaskRecord], node_codec: str = node.codec) -> bytes:
                return TaskBatch.encode_wire([r.spec.dispatched(r.dispatch, r.token) for r in batch],
                                             epoch=self.epoch, master=self.master_id,
                                             codec=node_codec)
            for batch in self._batches(records, node.max_payload):
                for _part, payload in codec.encode_within(batch, encode):
                    work.append((topic, payload, False))
        return work

    def _steal_requests(self, now: float) -> list[tuple[str, bytes, bool]]:
        """Ask nodes that hold prefetched work an idle node could run to hand some back."""
        out = []
        for node_id, count in self.scheduler.steals(now).items():
            node = self.scheduler.nodes[node_id]
            control = Control(command="release", params={"count": count}, epoch=self.epoch)
            out.append((self.topics.node_tasks(node_id), control.encode(node.codec), False))
        return out

    def _settle_finished(self) -> None:
        """Hand finished tasks' outcomes to their handles in this process now, and queue them
        for their clients (published after the commit)."""
        if self._finished:
            handles = self._handles
            by_client = self._client_outcomes
            watchers = self._watchers
            for record, value in self._finished:
                outcome = _outcome_dict(record, value)
                if handles:
                    handle = handles.pop(record.id, None)
                    if handle is not None:
                        handle.resolve(TaskOutcome.from_dict(outcome))
                if record.client:
                    outcomes = by_client.get(record.client)
                    if outcomes is None:
                        outcomes = by_client[record.client] = []
                    outcomes.append(outcome)
                if watchers:
                    for client_id in watchers.pop(record.id, ()):
                        by_client.setdefault(client_id, []).append(outcome)
            self._finished.clear()
        for client_id, outcomes in self._client_outcomes.items():
            topic = self.topics.client(client_id)
            for start in range(0, len(outcomes), self.max_batch):
                chunk = outcomes[start:start + self.max_batch]
                for _part, payload in codec.encode_within(chunk, OutcomeBatch.encode_wire):
                    self._outgoing.append((topic, payload, False))
        self._client_outcomes.clear()

    def _batches(self, records: list[TaskRecord], max_payload: int) -> Iterable[list[TaskRecord]]:
        if max_payload <= 0:
            for start in range(0, len(records), self.max_batch):
                yield records[start:start + self.max_batch]
            return
        batch: list[TaskRecord] = []
        size = 64
        for record in records:
            if batch and size + record.encoded_size() + 1 > max_payload:
                yield batch
                batch, size = [], 64
            batch.append(record)
            size += record.encoded_size() + 1
        if batch:
            yield batch

    def _send(self, messages: list[tuple[str, bytes, bool]]) -> None:
        """Publish (topic, payload, retain) messages in order, then empty the list."""
        publish = self._session.publish
        for topic, payload, retain in messages:
            try:
                publish(topic, payload, qos=1, retain=retain)
            except FabricError:
                log.exception("publish to %s failed", topic)
        messages.clear()

    def _master_status(self, status: str) -> MasterStatus:
        s = self.scheduler
        now = self._clock()
        live = [n for n in s.nodes.values() if n.alive]
        return MasterStatus(
            master_id=self.master_id, status=status, epoch=self.epoch, queued=s.queued,
            in_flight=len(s.tasks) - s.queued, completed=s.completed, failed=s.failed,
            duplicates=s.duplicates, rejected=self.rejected + s.rejected,
            nodes_ready=sum(1 for n in live if n.status == states.READY), nodes_total=len(live),
            ts=round(time.time(), 3), waiting=sum(s.waiting.values()),
            waiting_for=",".join(sorted(s.waiting)), cancelled=s.cancelled, expired=self.expired,
            uptime=round(self._uptime(now), 1), throughput=round(self._ended_rate.rate(
                now, s.completed + s.failed + s.cancelled), 1))


def _task_id(value: Any) -> str:
    """A task id from a query, checked: a clear error for anything else."""
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise ConfigError(f"a task id must be a string of 1-128 characters, got {value!r}")
    return value


def _conflict(task_id: str) -> str:
    return (f"{ID_CONFLICT}: task id {task_id!r} is bound to other work (another name or "
            "call); a task id names one piece of work: choose a new id")


def _outcome_dict(record: TaskRecord, value: Any) -> dict[str, Any]:
    """A finished task's outcome in its wire form (`TaskOutcome.to_dict()`)."""
    if record.state == COMPLETED:
        return {"id": record.spec.id, "state": states.COMPLETED, "value": value, "error": None,
                "node_id": record.node, "attempts": record.attempts}
    errors = record.errors
    last = dict(errors[-1]) if errors else {"kind": "failed", "message": "failed"}
    last["reasons"] = [f"{e.get('kind', 'error')}: {e.get('message', '')}" for e in errors]
    return {"id": record.spec.id, "state": STATE_NAMES[record.state], "value": None,
            "error": last, "node_id": record.node, "attempts": record.attempts}
