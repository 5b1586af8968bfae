"""The scheduler: who runs what next. Pure bookkeeping, no I/O; the clock is a parameter.

- Priorities 1-10, 10 most urgent, FIFO within a priority (ties broken by a sequence
  number, never by comparing tasks): core.priority_queue's order, whose entries name task
  ids; an entry whose task was requeued or finished since is skipped (lazy deletion).
- Credit-based dispatch: a node holds at most capacity + prefetch tasks; work goes to the
  least-loaded ready node first.
- A lost node's in-flight tasks go back to the front of their priority; a task that failed
  or lost its node `max_attempts` times ends as failed with every reason recorded.
- Every dispatch is an attempt with its own number and token. A result counts only if it
  answers the task's current dispatch, from the node it went to, with its token; a late copy
  of an answered dispatch is a duplicate, anything else is rejected (a node that lies).
- Tasks go only to nodes that advertise their name (and, for lambdas, the lambda's name). A
  name no node ever offered fails at once; one whose nodes are all gone waits, and says so.
- Idle first: when a node has free slots and nothing queued for it, nodes holding prefetched
  work are asked to hand some back (`steals`).
- Delays: a task with a start time (`due`) waits apart in the queue until then; a failed
  run is retried after its policy's backoff (master.retry_policy), only for the error kinds
  it names. A rate limit per task name (master.rate_limit) parks tasks of that name while
  its bucket is empty; `next_wake` says when either needs the next `assign`.
- Cancel: a queued task is never dispatched; a running one ends `cancelled` at once, while its
  slot on the node stays taken until the node says it stopped (or is gone): the master never
  sends work into a slot a cancelled task still occupies.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable

from core import codec, states
from core.defaults import (DEFAULT_CAPACITY, DEFAULT_HEARTBEAT, DEFAULT_MAX_ATTEMPTS,
                           DEFAULT_MAX_QUEUED, DEFAULT_NODE_TIMEOUT, DEFAULT_PREFETCH)
from core.errors import ConfigError, QueueFull
from core.priority_queue import Entry, PriorityQueue
from core.protocol import NodeStatus, TaskResult, TaskSpec, new_token
from master.liveness import heartbeat_timeout, silent_nodes
from master.rate_limit import RateLimit, TokenBucket
from master.retry_policy import RetryPolicy, registered_policy

__all__ = ["Scheduler", "TaskRecord", "NodeInfo", "QUEUED", "RUNNING", "COMPLETED", "FAILED",
           "CANCELLED", "STATE_NAMES", "STATE_CODES", "FINAL_STATES", "PERMANENT_ERRORS",
           "capability"]

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = 0, 1, 2, 3, 4
STATE_NAMES = dict(enumerate(states.TASK_STATES))  # QUEUED..CANCELLED, in the same order
STATE_CODES = {name: code for code, name in STATE_NAMES.items()}
FINAL_STATES = states.FINAL_STATES  # outcome states that are final
# errors that another attempt cannot cure
PERMANENT_ERRORS = frozenset({"unknown_task", "bad_request", "payload_too_large", "bad_result",
                              "unknown_lambda", "timeout"})
# errors that say the node lacks the task: another node that has it may still run it
_MISSING = frozenset({"unknown_task", "unknown_lambda"})
_RECENT_ANSWERED = 50_000  # answered dispatches remembered to tell a late copy from a forgery
_DISPATCH_BYTES = 48       # `"attempt": N, "token": "..."` in a dispatched task's JSON
STEAL_AGE = 0.1            # seconds prefetched work waits before an idle node may take it


def capability(spec: TaskSpec) -> str:
    """What a node must offer to run `spec`: its task name, or `lambda:NAME` for a lambda."""
    if spec.name == "lambda":
        name = spec.kwargs.get("name") if type(spec.kwargs) is dict else None
        return f"lambda:{name}" if isinstance(name, str) else "lambda:"
    return spec.name


@dataclass(slots=True)
class TaskRecord:
    spec: TaskSpec
    client: str = ""
    seq: int = 0
    state: int = QUEUED
    node: str = ""
    attempts: int = 0
    errors: list = field(default_factory=list)
    pinned: str = ""
    size: int = -1
    row: int = 0  # the task's row in the journal (0: not known yet)
    sent: float = 0.0  # when it was last sent to its node (the master's clock)
    dispatch: int = 0  # attempt number of the current (or last) dispatch
    token: str = ""    # its token ("" after a take-over that never learnt it: any from its node)
    sent_to: str = ""  # the node of that dispatch
    due: float = 0.0   # not dispatched before this (the scheduler's clock; 0: at once)

    @property
    def id(self) -> str:
        return self.spec.id

    def answers(self, node_id: str, result: TaskResult) -> bool:
        """Does `result` from `node_id` answer this task's current dispatch?"""
        return node_id == self.sent_to and (result.token == self.token or not self.token)

    def encoded_size(self) -> int:
        """Its JSON size as dispatched (with room for its attempt and token)."""
        if self.size < 0:
            self.size = len(codec.encode(self.spec.to_dict(), codec.JSON)) + _DISPATCH_BYTES
        return self.size


@dataclass(slots=True)
class NodeInfo:
    node_id: str
    status: str = states.CONNECTED
    kind: str = "cpython"
    codec: str = codec.MSGPACK
    capacity: int = DEFAULT_CAPACITY
    prefetch: int = DEFAULT_PREFETCH
    max_payload: int = 0
    instance: str = ""
    tasks: frozenset | None = None
    heartbeat: float = DEFAULT_HEARTBEAT
    last_seen: float = 0.0
    reported_ts: float = 0.0
    workload: int = 0
    tasks_done: int = 0
    tasks_failed: int = 0
    rejected: int = 0
    in_flight: set = field(default_factory=set)
    tasks_text: str | None = None  # `tasks` as the node last sent it
    lambdas: frozenset = frozenset()
    lambdas_text: str = ""
    refused: set = field(default_factory=set)  # capabilities it said it lacks after all
    seq: int = 0                  # birth sequence of its current connection
    release_asked: float = -1e18  # when it was last asked to hand back prefetched work

    @property
    def alive(self) -> bool:
        return self.status in states.LIVE_STATES

    @property
    def credit(self) -> int:
        return self.capacity + self.prefetch - len(self.in_flight)

    def offers(self, need: str) -> bool:
        """Does this node say it runs `need` (a `capability`)?"""
        if need in self.refused:
            return False
        if need.startswith("lambda:"):
            return (self.tasks is None or "lambda" in self.tasks) and need[7:] in self.lambdas
        return self.tasks is None or need in self.tasks

    def accepts(self, record: TaskRecord) -> bool:
        if not self.offers(capability(record.spec)):
            return False
        return self.max_payload <= 0 or record.encoded_size() <= self.max_payload

    def info(self) -> dict:
        return {"node_id": self.node_id, "status": self.status, "kind": self.kind,
                "codec": self.codec, "capacity": self.capacity, "prefetch": self.prefetch,
                "max_payload": self.max_payload, "workload": self.workload,
                "in_flight": len(self.in_flight), "tasks_done": self.tasks_done,
                "tasks_failed": self.tasks_failed, "rejected": self.rejected,
                "instance": self.instance, "last_seen": self.reported_ts,
                "heartbeat": self.heartbeat, "tasks": sorted(self.tasks or ()),
                "lambdas": sorted(self.lambdas)}


class Scheduler:
    """Queue, nodes and in-flight bookkeeping of the master."""

    def __init__(self, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 max_queued: int = DEFAULT_MAX_QUEUED, node_timeout: float = DEFAULT_NODE_TIMEOUT,
                 retry: RetryPolicy | None = None,
                 rate_limits: Iterable[RateLimit] = (),
                 rand: Callable[[], float] = random.random) -> None:
        self.max_attempts = max_attempts
        self.retry = retry or RetryPolicy()
        self._rand = rand  # draws the jitter of backoffs
        self.rate_limits = {limit.name: limit.per_second for limit in rate_limits}
        self._buckets: dict[str, TokenBucket] = {}
        self._parked: dict[str, PriorityQueue[str]] = {}  # name -> entries of its bucket
        self.max_queued = max_queued
        self.node_timeout = node_timeout
        self.tasks: dict[str, TaskRecord] = {}      # active: queued or in flight
        self.nodes: dict[str, NodeInfo] = {}
        self._queue: PriorityQueue[str] = PriorityQueue()  # task ids
        self.queued = 0
        self.completed = 0
        self.failed = 0
        self.duplicates = 0
        self.rejected = 0   # results that answer no dispatch of theirs: forged or misrouted
        self.bad_hints = 0  # failed results whose registered retry policy was not one
        self.requeued = 0
        self.unknown_failed: list[TaskRecord] = []  # drained by the master after assign()
        self._resend: dict[str, list[TaskRecord]] = {}  # lost on the way: send again
        self.waiting: dict[str, int] = {}  # capability -> queued tasks no live node offers
        # answered dispatches (id -> token; a token went to one node only), in two
        # generations: a bounded memory
        self._answered: dict[str, str] = {}
        self._answered_old: dict[str, str] = {}
        self.cancelled = 0
        # running tasks cancelled whose node has not said it stopped: id -> (node, when);
        # each still holds its slot in that node's in_flight (bounded by the nodes' credit)
        self._cancelling: dict[str, tuple[str, float]] = {}

    # -- queue ---------------------------------------------------------------------------------

    def submit(self, spec: TaskSpec, *, client: str = "", pinned: str = "",
               due: float = 0.0) -> TaskRecord | None:
        """Queue a new task (not dispatched before `due`); None if that id is already active.
        QueueFull past the bound."""
        if spec.id in self.tasks:
            return None
        if self.queued >= self.max_queued:
            raise QueueFull(f"queue is full ({self.max_queued} tasks waiting)")
        record = TaskRecord(spec=spec, client=client, pinned=pinned, due=due)
        self._enqueue((record,), front=False)
        return record

    @property
    def room(self) -> int:
        """How many more tasks the queue takes before QueueFull."""
        return max(0, self.max_queued - self.queued)

    def admit(self, records: Iterable[TaskRecord]) -> None:
        """Queue new tasks built (and journalled) by the caller; their ids must not be active
        and `room` must allow them (the master checks both before journalling)."""
        self._enqueue(records, front=False)

    def restore(self, record: TaskRecord, *, front: bool) -> None:
        """Put back a task read from the journal after a restart."""
        self._enqueue((record,), front=front)

    def _enqueue(self, records: Iterable[TaskRecord], *, front: bool) -> None:
        """The one way into the queue: active, queued behind their priority (in front of it
        if `front`), or waiting for their start time."""
        tasks, push = self.tasks, self._queue.push
        count = 0
        for record in records:
            spec = record.spec
            tasks[spec.id] = record
            record.seq = push(spec.id, spec.priority, front, record.due)
            record.state = QUEUED
            record.node = ""
            count += 1
        self.queued += count

    def _requeue(self, record: TaskRecord, node: NodeInfo | None, *, due: float = 0.0) -> None:
        if node is not None:
            node.in_flight.discard(record.id)
        self.requeued += 1
        record.due = due
        self._enqueue((record,), front=True)

    # -- nodes ---------------------------------------------------------------------------------

    def node_status(self, status: NodeStatus, now: float) -> tuple[list[str], list[TaskRecord]]:
        """Apply a node's status message. Returns (requeued ids, tasks that ended failed)."""
        node = self.nodes.get(status.node_id)
        requeued: list[str] = []
        failed: list[TaskRecord] = []
        gone = status.status in states.GONE_STATES
        if node is None:
            node = self.nodes[status.node_id] = NodeInfo(node_id=status.node_id)
        elif gone and node.instance and (status.instance != node.instance
                                         or status.seq < node.seq):
            return requeued, failed  # the will of a connection that was replaced since
        elif node.instance and status.instance and node.instance != status.instance:
            r, f = self._lose_tasks(node, f"node {node.node_id} restarted", count=True)
            requeued += r
            failed += f
            node.refused.clear()
        if status.status == states.DEAD and node.instance:
            # a will is written at connect: keep what the node said last, and when
            node.status = states.DEAD
            r, f = self._lose_tasks(node, f"node {node.node_id} dead", count=True)
            return requeued + r, failed + f
        node.seq = status.seq
        node.status = status.status
        node.kind = status.kind
        node.codec = status.codec
        node.capacity = status.capacity
        node.prefetch = status.prefetch
        node.max_payload = status.max_payload
        node.instance = status.instance or node.instance
        if status.tasks != node.tasks_text:  # parsed once, not at every heartbeat
            node.tasks_text = status.tasks
            node.tasks = frozenset(status.tasks.split(",")) if status.tasks else None
        if status.lambdas != node.lambdas_text:
            node.lambdas_text = status.lambdas
            node.lambdas = frozenset(status.lambdas.split(",")) if status.lambdas else frozenset()
        node.heartbeat = status.heartbeat if status.heartbeat > 0 else DEFAULT_HEARTBEAT
        node.workload = status.workload
        node.tasks_done = status.tasks_done
        node.tasks_failed = status.tasks_failed
        node.rejected = status.rejected
        node.reported_ts = status.ts
        if gone:
            r, f = self._lose_tasks(node, f"node {node.node_id} {status.status}",
                                    count=status.status == states.DEAD)
            requeued += r
            failed += f
        else:
            node.last_seen = now
        return requeued, failed

    def heard_from(self, node_id: str, now: float) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.alive:
            node.last_seen = now

    def stranded(self, node_id: str, now: float, *, age: float) -> int:
        """The node says it holds nothing, yet tasks sent to it more than `age` ago have no
        result: the task or its result was lost on the way (a broker whose queue for a
        client overflows drops messages). The next `assign` sends them to it again; it
        answers from its cache if it ran them. How many."""
        node = self.nodes.get(node_id)
        if node is None or not node.in_flight:
            return 0
        cutoff = now - age
        if self._cancelling:  # cancelled here, and the node holds nothing: it stopped them
            for task_id in [t for t in node.in_flight if t not in self.tasks]:
                entry = self._cancelling.get(task_id)
                if entry is None or entry[1] < cutoff:
                    self._cancelling.pop(task_id, None)
                    node.in_flight.discard(task_id)
        lost = [r for r in map(self.tasks.get, node.in_flight) if r is not None
                and r.state == RUNNING and r.node == node_id and r.sent < cutoff]
        for record in lost:
            record.sent = now
        if lost:
            self._resend.setdefault(node_id, []).extend(lost)
        return len(lost)

    def set_prefetch(self, node_id: str, prefetch: int) -> None:
        """A node's prefetch changed (it adapts it to its task durations)."""
        node = self.nodes.get(node_id)
        if node is not None:
            node.prefetch = prefetch

    def lose_node(self, node_id: str, reason: str, *, status: str = states.DEAD
                  ) -> tuple[list[str], list[TaskRecord]]:
        """The node is gone (will, missed heartbeats): its in-flight tasks go back in front."""
        node = self.nodes.get(node_id)
        if node is None:
            return [], []
        node.status = status
        return self._lose_tasks(node, reason, count=True)

    def _lose_tasks(self, node: NodeInfo, reason: str, *, count: bool
                    ) -> tuple[list[str], list[TaskRecord]]:
        requeued: list[str] = []
        failed: list[TaskRecord] = []
        for task_id in list(node.in_flight):
            record = self.tasks.get(task_id)
            node.in_flight.discard(task_id)
            if record is None or record.state != RUNNING or record.node != node.node_id:
                if self._cancelling:
                    self._cancelling.pop(task_id, None)
                continue
            if count:
                record.attempts += 1
                record.errors.append({"kind": "node_lost", "message": reason,
                                      "node_id": node.node_id, "attempt": record.dispatch})
                if record.attempts >= (record.spec.max_attempts or self.max_attempts):
                    self._finish(record, FAILED)
                    failed.append(record)
                    continue
            self._requeue(record, None)
            requeued.append(task_id)
        return requeued, failed

    def release(self, node_id: str, task_ids: Iterable[str]) -> list[str]:
        """Tasks a node handed back unstarted: to the front, no attempt counted."""
        node = self.nodes.get(node_id)
        out = []
        for task_id in task_ids:
            record = self.tasks.get(task_id)
            if record is not None and record.state == RUNNING and record.node == node_id:
                self._requeue(record, node)
                out.append(task_id)
            elif record is None and self._cancelling:
                self._stopped(node_id, task_id)
        return out

    def adopt(self, node_id: str, task_ids: Iterable[str]) -> list[TaskRecord]:
        """Queued tasks that a live node reports holding (after a master take-over) go in
        flight on it, so they are not dispatched twice; the records adopted."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return []
        adopted = []
        for task_id in task_ids:
            record = self.tasks.get(task_id)
            if record is None or record.state != QUEUED:
                continue
            record.state = RUNNING  # its heap entry is now stale: assign() skips it
            record.node = node_id
            if record.sent_to != node_id:  # the node holds a dispatch the journal never saw
                record.sent_to, record.token = node_id, ""
            self.queued -= 1
            node.in_flight.add(task_id)
            adopted.append(record)
        return adopted

    def forget(self, node_id: str) -> list[str]:
        requeued, _ = self._lose_tasks(self.nodes[node_id], "forgotten", count=False) \
            if node_id in self.nodes else ([], [])
        self.nodes.pop(node_id, None)
        return requeued

    def silent(self, now: float) -> list[str]:
        """Live nodes whose heartbeats stopped for longer than their timeout."""
        return silent_nodes(((n.node_id, n.last_seen, heartbeat_timeout(
            n.heartbeat, misses=2.5, floor=self.node_timeout)) for n in self.nodes.values()
            if n.alive), now)

    # -- results -------------------------------------------------------------------------------

    def result(self, node_id: str, result: TaskResult, *, now: float = 0.0
               ) -> tuple[str, TaskRecord | None]:
        """Apply one result: 'completed', 'failed', 'retry' (queued again, after its backoff
        from `now`), 'duplicate' (a late copy of an answered dispatch, dropped) or 'rejected'
        (it answers no dispatch of that node)."""
        record = self.tasks.get(result.id)
        if record is None and self._cancelling and self._stopped(node_id, result.id):
            return "duplicate", None
        if record is None or record.state not in (QUEUED, RUNNING):
            answered = self._answered.get(result.id) or self._answered_old.get(result.id)
            if answered is not None and answered == result.token:
                self.duplicates += 1
                return "duplicate", record
            self.rejected += 1
            return "rejected", record
        if not record.answers(node_id, result):
            self.rejected += 1
            return "rejected", record
        holder = self.nodes.get(record.node)
        if holder is not None:
            holder.in_flight.discard(record.id)
        self._remember(record)
        if result.ok:
            record.node = node_id
            self._finish(record, COMPLETED)
            return states.COMPLETED, record
        error = dict(result.error or {})
        hint = error.pop("retry", None)  # the policy the task was registered with, if any
        error.setdefault("node_id", node_id)
        error.setdefault("attempt", result.attempt)
        record.errors.append(error)
        record.node = node_id
        kind = error.get("kind")
        if kind in _MISSING and self._lacks(node_id, record):
            return self._retry(record)  # not a run: the node never had it
        record.attempts += 1
        policy, limit = self._policy(record.spec, hint)
        if not policy.retries(kind, PERMANENT_ERRORS) or record.attempts >= limit:
            self._finish(record, FAILED)
            return states.FAILED, record
        if policy.backoff:
            return self._retry(record, due=now + policy.delay(record.attempts, self._rand()))
        return self._retry(record)

    def _policy(self, spec: TaskSpec, hint: object) -> tuple[RetryPolicy, int]:
        """The retry policy and attempts of a failed run: what the submission said, else
        what the task was registered with on its node (`hint`), else the master's default."""
        policy, limit = self.retry, spec.max_attempts
        if hint is not None:
            try:
                policy, registered = registered_policy(hint, self.retry)
                limit = limit or registered
            except ConfigError:  # a node's mistake: the task keeps the master's policy
                self.bad_hints += 1
        if spec.backoff is not None or spec.backoff_max is not None or spec.retry_on is not None:
            policy = policy.for_task(spec)
        return policy, limit or self.max_attempts

    def _stopped(self, node_id: str, task_id: str) -> bool:
        """A node's word on a task cancelled while it ran there: its slot is free again."""
        entry = self._cancelling.get(task_id)
        if entry is None or entry[0] != node_id:
            return False
        del self._cancelling[task_id]
        node = self.nodes.get(node_id)
        if node is not None:
            node.in_flight.discard(task_id)
        return True

    def cancel(self, task_id: str, reason: str, now: float) -> tuple[str, TaskRecord | None]:
        """Cancel an active task: ('queued' | 'running', its record), or ('', None) if it is
        not active. A queued task is never dispatched; a running one ends at once and keeps
        its node's slot (`record.node`, to be told) until the node says it stopped."""
        record = self.tasks.get(task_id)
        if record is None:
            return "", None
        was = STATE_NAMES[record.state]
        error = {"kind": "cancelled", "message": reason}
        if record.state == RUNNING:
            error.update(node_id=record.node, attempt=record.dispatch)
        record.errors.append(error)
        if record.state == RUNNING:
            node = self.nodes.get(record.node)
            if node is not None and task_id in node.in_flight:
                self._cancelling[task_id] = (record.node, now)
            self._remember(record)
        self._finish(record, CANCELLED)
        return was, record

    def _retry(self, record: TaskRecord, *, due: float = 0.0) -> tuple[str, TaskRecord]:
        if record.state != QUEUED:  # else already requeued (its node was thought lost)
            self._requeue(record, None, due=due)
        return "retry", record

    def _lacks(self, node_id: str, record: TaskRecord) -> bool:
        """The node answered that it lacks the task: never offer it that name again. True if
        another known node offers it, so the task may still run there."""
        need = capability(record.spec)
        node = self.nodes.get(node_id)
        if node is not None:
            node.refused.add(need)
        return any(n.offers(need) for n in self.nodes.values() if n.node_id != node_id)

    def _remember(self, record: TaskRecord) -> None:
        """Remember an answered dispatch, to tell its late copies from forgeries."""
        answered = self._answered
        if len(answered) >= _RECENT_ANSWERED:
            self._answered_old = answered
            answered = self._answered = {}
        answered[record.spec.id] = record.token

    def complete_many(self, node_id: str, results: Iterable[TaskResult]
                      ) -> tuple[list[tuple[TaskRecord, TaskResult]], list[TaskResult]]:
        """Apply a node's successful results of active tasks in one pass (what a batch mostly
        holds); returns those (record, result) pairs, and the other results, which the
        caller applies one by one with `result`."""
        tasks, nodes = self.tasks, self.nodes
        done: list[tuple[TaskRecord, TaskResult]] = []
        rest: list[TaskResult] = []
        queued = 0
        answered = self._answered
        for result in results:
            record = tasks.get(result.id) if result.ok else None
            if record is None or record.state > RUNNING or record.sent_to != node_id \
                    or record.token != result.token:
                rest.append(result)  # the careful path decides (and counts) what it is
                continue
            holder = nodes.get(record.node)
            if holder is not None:
                holder.in_flight.discard(result.id)
            if record.state == QUEUED:
                queued += 1
            record.node = node_id
            record.state = COMPLETED
            del tasks[result.id]
            answered[result.id] = result.token
            done.append((record, result))
        if len(answered) >= _RECENT_ANSWERED:
            self._answered_old, self._answered = answered, {}
        self.queued -= queued
        self.completed += len(done)
        return done, rest

    def _finish(self, record: TaskRecord, state: int) -> None:
        if record.state == QUEUED:
            self.queued -= 1
        record.state = state
        self.tasks.pop(record.id, None)
        if state == COMPLETED:
            self.completed += 1
        elif state == CANCELLED:
            self.cancelled += 1
        else:
            self.failed += 1

    # -- dispatch ------------------------------------------------------------------------------

    def assign(self, *, now: float = 0.0) -> dict[str, list[TaskRecord]]:
        """Hand queued tasks to live nodes with credit, least-loaded first (and tasks found
        stranded to their node again).

        Each task goes to the node with the lowest in_flight / capacity among those with
        credit that accept it (its pinned node, if alive). Per-node credit and load are kept
        in local lists for the turn: this runs for every task of a busy queue.
        """
        out = self._take_resends() if self._resend else {}
        queue = self._queue
        due = queue.next_due()
        if due is not None and due <= now:
            self._promote(now)
        if self._parked:
            self._unpark(now)
        limited = self.rate_limits
        heap = queue.heap  # popped here with heapq itself: see core.priority_queue
        if not heap:
            if self.waiting:
                self.waiting = {}
            return out
        ready = [n for n in self.nodes.values() if n.alive and n.credit > 0]
        if not ready:
            return out
        left = [n.credit for n in ready]
        held = [len(n.in_flight) for n in ready]
        caps = [max(1, n.capacity) for n in ready]
        names = [n.tasks for n in ready]          # None: runs any task name
        plain = [not n.refused for n in ready]    # False: check each task with accepts()
        limits = [n.max_payload for n in ready]   # <= 0: any size
        index = {n.node_id: i for i, n in enumerate(ready)}
        loads = [(held[i] / caps[i], i) for i in range(len(ready))]
        heapq.heapify(loads)
        batches: list[list[TaskRecord]] = [[] for _ in ready]
        skipped: list[Entry[str]] = []
        runnable: dict[str, str] = {}
        waiting: dict[str, int] = {}
        tasks = self.tasks
        pop, replace = heapq.heappop, heapq.heapreplace
        token = new_token
        assigned = 0
        while heap and loads:
            entry = pop(heap)
            record = tasks.get(entry[2])
            if record is None or record.state != QUEUED or record.seq != entry[1]:
                continue  # stale entry of a task requeued or finished since
            if record.pinned:
                i = self._pinned_slot(record, index, left)
                if i is None and record.pinned:  # its node is alive but full: later
                    skipped.append(entry)
                    continue
            else:
                i = None
            if i is None:
                i = loads[0][1]
                accepted = names[i]
                name = record.spec.name
                if name == "lambda" or not plain[i] \
                        or (accepted is not None and name not in accepted) \
                        or (limits[i] > 0 and record.encoded_size() > limits[i]):
                    fits = [e for e in loads if ready[e[1]].accepts(record)]
                    i = min(fits)[1] if fits else None
            if i is None:
                need = capability(record.spec)
                where = runnable.get(need)
                if where is None:
                    where = runnable[need] = self._offered(need)
                if where == "nowhere":
                    self._fail_unknown(record, need)
                    continue
                if where == "gone":
                    waiting[need] = waiting.get(need, 0) + 1
                skipped.append(entry)
                continue
            if limited and record.spec.name in limited and not self._allowed(record, entry, now):
                continue  # parked until its name's bucket has a token
            node = ready[i]
            record.state = RUNNING
            record.node = record.sent_to = node.node_id
            record.sent = now
            record.dispatch += 1
            record.token = token()
            node.in_flight.add(entry[2])
            batches[i].append(record)
            assigned += 1
            left[i] -= 1
            held[i] += 1
            if loads[0][1] == i:
                if left[i] > 0:
                    replace(loads, (held[i] / caps[i], i))
                else:
                    pop(loads)
            else:  # a pinned or choosy task went to a node below the top: rebuild (rare)
                loads = [(held[j] / caps[j], j) for _l, j in loads if left[j] > 0]
                heapq.heapify(loads)
        self.queued -= assigned
        self.waiting = waiting
        for entry in skipped:
            heapq.heappush(heap, entry)
        for i, batch in enumerate(batches):
            if batch:
                out.setdefault(ready[i].node_id, []).extend(batch)
        return out

    def _promote(self, now: float) -> None:
        """Tasks whose start time has come join the queue, in front of their priority."""
        queue, tasks = self._queue, self.tasks
        for seq, task_id in queue.due_items(now):
            record = tasks.get(task_id)
            if record is not None and record.state == QUEUED and record.seq == seq:
                record.due = 0.0
                record.seq = queue.push(task_id, record.spec.priority, front=True)

    def _allowed(self, record: TaskRecord, entry: Entry[str], now: float) -> bool:
        """Take a start from the bucket of the task's name; park the task if there is none."""
        name = record.spec.name
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(self.rate_limits[name], now=now)
        if bucket.take(now):
            return True
        parked = self._parked.get(name)
        if parked is None:
            parked = self._parked[name] = PriorityQueue()
        parked.push_entry(entry)
        return False

    def _unpark(self, now: float) -> None:
        """Parked tasks back into the queue, as many per name as its bucket allows now."""
        push_entry = self._queue.push_entry
        for name in list(self._parked):
            parked = self._parked[name]
            for _ in range(min(len(parked), self._buckets[name].available(now))):
                push_entry(parked.pop_entry())
            if not parked:
                del self._parked[name]

    def next_wake(self, now: float) -> float | None:
        """When, after `now`, a delayed task falls due or a parked one may start (None: no
        such time): the master's loop waits no longer than that for its next `assign`. A
        parked task whose bucket has a start already waits for a node, not for the clock."""
        due = self._queue.next_due()
        wake = due if due is not None and due > now else None
        for name in self._parked:
            at = self._buckets[name].next_at(now)
            if at > now:
                wake = at if wake is None else min(wake, at)
        return wake

    def _take_resends(self) -> dict[str, list[TaskRecord]]:
        """Stranded tasks still in flight on their (live) node."""
        out = {}
        for node_id, records in self._resend.items():
            node = self.nodes.get(node_id)
            if node is not None and node.alive:
                still = [r for r in records if r.state == RUNNING and r.node == node_id]
                if still:
                    out[node_id] = still
        self._resend = {}
        return out

    def _pinned_slot(self, record: TaskRecord, index: dict[str, int],
                     left: list[int]) -> int | None:
        """Where a pinned task may go this turn: its node's slot, or None (it waits if its
        node is alive but full; if the node is gone the pin is dropped: any node will do)."""
        node = self.nodes.get(record.pinned)
        if node is not None and node.alive:
            i = index.get(record.pinned)
            return i if i is not None and left[i] > 0 else None
        record.pinned = ""
        return None

    def _offered(self, need: str) -> str:
        """Who offers `need`: 'live' (a live node, busy or not), 'gone' (only nodes that are
        gone: the task waits for one to come back), or 'nowhere' (no node ever did)."""
        offered = [n for n in self.nodes.values() if n.offers(need)]
        if any(n.alive for n in offered):
            return "live"
        return "gone" if offered else "nowhere"

    def _fail_unknown(self, record: TaskRecord, need: str) -> None:
        """No node ever offered what this task needs: fail it now, not queue it forever."""
        nodes = list(self.nodes.values())
        if need.startswith("lambda:"):
            known = sorted({f for n in nodes for f in n.lambdas})
            error = {"kind": "unknown_lambda", "message":
                     f"no node runs a lambda named {need[7:]!r} "
                     f"(available: {', '.join(known) or 'none'})"}
        else:
            known = sorted({t for n in nodes if n.tasks for t in n.tasks})
            error = {"kind": "unknown_task", "message":
                     f"no node runs a task named {record.spec.name!r} "
                     f"(available: {', '.join(known) or 'none'})"}
        record.errors.append(error)
        self._finish(record, FAILED)
        self.unknown_failed.append(record)

    def steals(self, now: float, *, age: float = STEAL_AGE) -> dict[str, int]:
        """Idle first: nodes holding prefetched work that an idle node could run, and how
        many tasks each is asked to hand back (it returns those it has not started).

        A node with free slots is idle only when nothing queued is for it (assign ran first).
        Work younger than `age` is left where it is: a stream of tiny tasks would otherwise be
        passed back and forth instead of run. A node is asked at most once per `age`."""
        idle = [n for n in self.nodes.values() if n.alive and len(n.in_flight) < n.capacity]
        if not idle:
            return {}
        cutoff = now - age
        asks: dict[str, int] = {}
        tasks = self.tasks
        for holder in self.nodes.values():
            extra = len(holder.in_flight) - holder.capacity
            if extra <= 0 or not holder.alive or holder.release_asked > cutoff:
                continue
            takers = [n for n in idle if n is not holder]
            if not takers:
                continue
            free = sum(n.capacity - len(n.in_flight) for n in takers)
            movable = 0
            for task_id in holder.in_flight:
                record = tasks.get(task_id)
                if record is not None and record.state == RUNNING and record.sent <= cutoff \
                        and any(n.accepts(record) for n in takers):
                    movable += 1
                    if movable >= extra:
                        break
            count = min(extra, free, movable)
            if count > 0:
                holder.release_asked = now
                asks[holder.node_id] = count
        return asks
