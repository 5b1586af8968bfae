"""The scheduler: who runs what next. Pure bookkeeping, no I/O; the clock is a parameter.

- Priorities 1-10, 10 most urgent, FIFO within a priority (ties broken by a sequence
  number, never by comparing tasks).
- Credit-based dispatch: a node holds at most capacity + prefetch tasks; work goes to the
  least-loaded ready node first.
- A lost node's in-flight tasks go back to the front of their priority; a task that failed
  or lost its node `max_attempts` times ends as failed with every reason recorded.
- A result is kept once per task id; later copies are dropped and counted.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Iterable

from core import codec
from core.errors import QueueFull
from core.protocol import NodeStatus, TaskResult, TaskSpec
from master.liveness import heartbeat_timeout, silent_nodes

__all__ = ["Scheduler", "TaskRecord", "NodeInfo", "QUEUED", "RUNNING", "COMPLETED", "FAILED",
           "STATE_NAMES", "PERMANENT_ERRORS"]

QUEUED, RUNNING, COMPLETED, FAILED = 0, 1, 2, 3
STATE_NAMES = {QUEUED: "queued", RUNNING: "running", COMPLETED: "completed", FAILED: "failed"}
LIVE_STATES = frozenset({"connected", "ready", "busy"})
# errors that another attempt cannot cure
PERMANENT_ERRORS = frozenset({"unknown_task", "bad_request", "payload_too_large", "bad_result",
                              "unknown_lambda", "timeout"})


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

    @property
    def id(self) -> str:
        return self.spec.id

    def encoded_size(self) -> int:
        if self.size < 0:
            self.size = len(codec.encode(self.spec.to_dict(), codec.JSON))
        return self.size


@dataclass(slots=True)
class NodeInfo:
    node_id: str
    status: str = "connected"
    kind: str = "cpython"
    codec: str = codec.MSGPACK
    capacity: int = 1
    prefetch: int = 1
    max_payload: int = 0
    instance: str = ""
    tasks: frozenset | None = None
    heartbeat: float = 1.0
    last_seen: float = 0.0
    reported_ts: float = 0.0
    workload: int = 0
    tasks_done: int = 0
    tasks_failed: int = 0
    rejected: int = 0
    in_flight: set = field(default_factory=set)

    @property
    def alive(self) -> bool:
        return self.status in LIVE_STATES

    @property
    def credit(self) -> int:
        return self.capacity + self.prefetch - len(self.in_flight)

    def accepts(self, record: TaskRecord) -> bool:
        if self.tasks is not None and record.spec.name not in self.tasks:
            return False
        return self.max_payload <= 0 or record.encoded_size() <= self.max_payload

    def info(self) -> dict:
        return {"node_id": self.node_id, "status": self.status, "kind": self.kind,
                "codec": self.codec, "capacity": self.capacity, "prefetch": self.prefetch,
                "max_payload": self.max_payload, "workload": self.workload,
                "in_flight": len(self.in_flight), "tasks_done": self.tasks_done,
                "tasks_failed": self.tasks_failed, "rejected": self.rejected,
                "instance": self.instance, "last_seen": self.reported_ts,
                "heartbeat": self.heartbeat}


class Scheduler:
    """Queue, nodes and in-flight bookkeeping of the master."""

    def __init__(self, *, max_attempts: int = 3, max_queued: int = 1_000_000,
                 node_timeout: float = 3.0) -> None:
        self.max_attempts = max_attempts
        self.max_queued = max_queued
        self.node_timeout = node_timeout
        self.tasks: dict[str, TaskRecord] = {}      # active: queued or in flight
        self.nodes: dict[str, NodeInfo] = {}
        self._heap: list[tuple[int, int, str]] = []
        self._back = itertools.count(1)
        self._front = itertools.count(-1, -1)
        self.queued = 0
        self.completed = 0
        self.failed = 0
        self.duplicates = 0
        self.requeued = 0
        self.unknown_failed: list[TaskRecord] = []  # drained by the master after assign()

    # -- queue ---------------------------------------------------------------------------------

    def submit(self, spec: TaskSpec, *, client: str = "", pinned: str = "") -> TaskRecord | None:
        """Queue a new task; None if that id is already active. QueueFull past the bound."""
        if spec.id in self.tasks:
            return None
        if self.queued >= self.max_queued:
            raise QueueFull(f"queue is full ({self.max_queued} tasks waiting)")
        record = TaskRecord(spec=spec, client=client, pinned=pinned)
        self.tasks[spec.id] = record
        self._enqueue(record, front=False)
        return record

    def restore(self, record: TaskRecord, *, front: bool) -> None:
        """Put back a task read from the journal after a restart."""
        record.state = QUEUED
        record.node = ""
        self.tasks[record.id] = record
        self._enqueue(record, front=front)

    def _enqueue(self, record: TaskRecord, *, front: bool) -> None:
        record.seq = next(self._front) if front else next(self._back)
        record.state = QUEUED
        record.node = ""
        self.queued += 1
        heapq.heappush(self._heap, (-record.spec.priority, record.seq, record.spec.id))

    def _requeue(self, record: TaskRecord, node: NodeInfo | None) -> None:
        if node is not None:
            node.in_flight.discard(record.id)
        self.requeued += 1
        self._enqueue(record, front=True)

    # -- nodes ---------------------------------------------------------------------------------

    def node_status(self, status: NodeStatus, now: float) -> tuple[list[str], list[TaskRecord]]:
        """Apply a node's status message. Returns (requeued ids, tasks that ended failed)."""
        node = self.nodes.get(status.node_id)
        requeued: list[str] = []
        failed: list[TaskRecord] = []
        if node is None:
            node = self.nodes[status.node_id] = NodeInfo(node_id=status.node_id)
        elif node.instance and status.instance and node.instance != status.instance:
            r, f = self._lose_tasks(node, f"node {node.node_id} restarted", count=True)
            requeued += r
            failed += f
        node.status = status.status
        node.kind = status.kind
        node.codec = status.codec
        node.capacity = status.capacity
        node.prefetch = status.prefetch
        node.max_payload = status.max_payload
        node.instance = status.instance or node.instance
        node.tasks = frozenset(status.tasks.split(",")) if status.tasks else None
        node.heartbeat = status.heartbeat if status.heartbeat > 0 else 1.0
        node.workload = status.workload
        node.tasks_done = status.tasks_done
        node.tasks_failed = status.tasks_failed
        node.rejected = status.rejected
        node.reported_ts = status.ts
        if status.status in ("dead", "offline"):
            r, f = self._lose_tasks(node, f"node {node.node_id} {status.status}",
                                    count=status.status == "dead")
            requeued += r
            failed += f
        else:
            node.last_seen = now
        return requeued, failed

    def heard_from(self, node_id: str, now: float) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.alive:
            node.last_seen = now

    def lose_node(self, node_id: str, reason: str, *, status: str = "dead"
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
                continue
            if count:
                record.attempts += 1
                record.errors.append({"kind": "node_lost", "message": reason})
                if record.attempts >= self.max_attempts:
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
        return out

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

    def result(self, node_id: str, result: TaskResult) -> tuple[str, TaskRecord | None]:
        """Apply one result: 'completed', 'failed', 'retry', or 'duplicate' (dropped)."""
        record = self.tasks.get(result.id)
        if record is None or record.state not in (QUEUED, RUNNING):
            self.duplicates += 1
            return "duplicate", record
        holder = self.nodes.get(record.node)
        if holder is not None:
            holder.in_flight.discard(record.id)
        if result.ok:
            record.node = node_id
            self._finish(record, COMPLETED)
            return "completed", record
        error = dict(result.error or {})
        error.setdefault("node_id", node_id)
        record.errors.append(error)
        record.attempts += 1
        record.node = node_id
        if error.get("kind") in PERMANENT_ERRORS or record.attempts >= self.max_attempts:
            self._finish(record, FAILED)
            return "failed", record
        if record.state == QUEUED:  # already requeued (node was thought lost): keep that entry
            return "retry", record
        self._requeue(record, None)
        return "retry", record

    def _finish(self, record: TaskRecord, state: int) -> None:
        if record.state == QUEUED:
            self.queued -= 1
        record.state = state
        self.tasks.pop(record.id, None)
        if state == COMPLETED:
            self.completed += 1
        else:
            self.failed += 1

    # -- dispatch ------------------------------------------------------------------------------

    def assign(self) -> dict[str, list[TaskRecord]]:
        """Hand queued tasks to live nodes with credit, least-loaded first."""
        ready = [n for n in self.nodes.values() if n.alive and n.credit > 0]
        if not ready or not self._heap:
            return {}
        loads = [(len(n.in_flight) / max(1, n.capacity), i, n) for i, n in enumerate(ready)]
        heapq.heapify(loads)
        out: dict[str, list[TaskRecord]] = {}
        skipped: list[tuple[int, int, str]] = []
        runnable: dict[str, bool] = {}
        while self._heap and loads:
            entry = heapq.heappop(self._heap)
            record = self.tasks.get(entry[2])
            if record is None or record.state != QUEUED or record.seq != entry[1]:
                continue  # stale entry of a task requeued or finished since
            node = self._pick(record, loads)
            if node is None:
                name = record.spec.name
                if name not in runnable:
                    runnable[name] = any(n.alive and (n.tasks is None or name in n.tasks)
                                         for n in self.nodes.values())
                if not runnable[name]:
                    self._fail_unknown(record)
                    continue
                skipped.append(entry)
                continue
            record.state = RUNNING
            record.node = node.node_id
            self.queued -= 1
            node.in_flight.add(record.id)
            out.setdefault(node.node_id, []).append(record)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return out

    def _fail_unknown(self, record: TaskRecord) -> None:
        """No live node offers this task name: fail it now rather than queue it forever."""
        known = sorted({t for n in self.nodes.values() if n.alive and n.tasks for t in n.tasks})
        record.errors.append({"kind": "unknown_task", "message":
                              f"no live node runs a task named {record.spec.name!r} "
                              f"(available: {', '.join(known) or 'none'})"})
        self._finish(record, FAILED)
        self.unknown_failed.append(record)

    def _pick(self, record: TaskRecord, loads: list) -> NodeInfo | None:
        """The least-loaded node with credit that accepts `record`; keeps `loads` a heap."""
        if record.pinned:
            node = self.nodes.get(record.pinned)
            if node is not None and node.alive:
                return node if node.credit > 0 else None
            record.pinned = ""  # its node is gone: any node will do
        while loads and loads[0][2].credit <= 0:  # filled by a pinned task meanwhile
            heapq.heappop(loads)
        if not loads:
            return None
        best = 0
        if not loads[0][2].accepts(record):
            candidates = [i for i, entry in enumerate(loads)
                          if entry[2].credit > 0 and entry[2].accepts(record)]
            if not candidates:
                return None
            best = min(candidates, key=loads.__getitem__)
        _load, index, node = loads[best]
        if node.credit > 1:
            updated = ((len(node.in_flight) + 1) / max(1, node.capacity), index, node)
            if best == 0:
                heapq.heapreplace(loads, updated)
            else:
                loads[best] = updated
                heapq.heapify(loads)
        else:
            loads[best] = loads[-1]
            loads.pop()
            heapq.heapify(loads)
        return node
