"""Snapshots: the coordinator's state and every node's own report, as one JSON file.

Every `interval` seconds (and on `master-node snapshot`) the master records what it holds
(pending tasks by priority, in flight by node, completed and failed counts, nodes), asks every
live node for its state with a `snapshot` control message, collects the answers for a bounded
time (until all live nodes answered, at most `collect` seconds) without blocking its own
loop, and writes `snapshot_<n>_<UTC time>.json` atomically (temp file + rename).

The file keeps the names of the coordinator/worker prime finder this follows: `coordinator`,
`workers` (node id -> report, e.g. `tasks_processed`, `tasks_failed`, `held`), `timestamp`.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from core.errors import ConfigError, FabricError
from core.protocol import NodeReport
from master.atomic_file import atomic_text_file
from master.hooks import MasterHooks
from master.scheduler import QUEUED

__all__ = ["Snapshotter", "coordinator_state", "snapshot_filename", "next_snapshot_number",
           "expired_snapshots", "SNAPSHOT_QUERY", "SNAPSHOT_STATUS_QUERY"]

log = logging.getLogger(__name__)

SNAPSHOT_QUERY = "snapshot"
SNAPSHOT_STATUS_QUERY = "snapshot_status"
_NAME = re.compile(r"^snapshot_(\d+)_[0-9TZ]+\.json$")
_MAX_CONCURRENT = 4
_REMEMBERED = 64


# -- pure helpers ----------------------------------------------------------------------------------

def snapshot_filename(number: int, timestamp: float) -> str:
    """`snapshot_<n>_<YYYYmmddTHHMMSSZ>.json`: sorts by time, names say when."""
    return f"snapshot_{number}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(timestamp))}.json"


def next_snapshot_number(names: Iterable[str]) -> int:
    """One more than the highest snapshot number among `names` (1 when there is none)."""
    numbers = [int(m.group(1)) for m in map(_NAME.match, names) if m]
    return max(numbers, default=0) + 1


def expired_snapshots(names: Iterable[str], keep: int) -> list[str]:
    """The snapshot files beyond the newest `keep` (oldest first): what to delete."""
    numbered = sorted((int(m.group(1)), m.group(0)) for m in map(_NAME.match, names) if m)
    return [name for _n, name in numbered[:max(0, len(numbered) - keep)]]


def coordinator_state(scheduler: Any, *, master_id: str, limit: int = 1000) -> dict[str, Any]:
    """What the master holds, from its scheduler (the caller holds the master's lock).

    Pending tasks are listed in dispatch order up to `limit`, with exact counts beside them,
    so a queue of a million tasks gives a file of bounded size.
    """
    queued_by_priority: dict[str, int] = {}
    queued: list[tuple[int, int, Any]] = []
    in_flight: dict[str, list[str]] = {}
    for record in scheduler.tasks.values():
        if record.state == QUEUED:
            key = str(record.spec.priority)
            queued_by_priority[key] = queued_by_priority.get(key, 0) + 1
            queued.append((-record.spec.priority, record.seq, record))
        else:
            in_flight.setdefault(record.node, []).append(record.id)
    listed = heapq.nsmallest(limit, queued, key=lambda e: (e[0], e[1]))
    nodes = sorted(scheduler.nodes.values(), key=lambda n: n.node_id)
    return {
        "master_id": master_id,
        "pending_tasks": [{"id": r.id, "name": r.spec.name, "priority": r.spec.priority,
                           "attempts": r.attempts} for _p, _s, r in listed],
        "pending_total": len(queued),
        "pending_listed": len(listed),
        "pending_by_priority": dict(sorted(queued_by_priority.items(),
                                           key=lambda kv: -int(kv[0]))),
        "in_flight": {node: {"count": len(ids), "tasks": sorted(ids)[:limit]}
                      for node, ids in sorted(in_flight.items())},
        "in_flight_total": sum(len(ids) for ids in in_flight.values()),
        "completed_tasks": scheduler.completed,
        "failed_tasks": scheduler.failed,
        "duplicates": scheduler.duplicates,
        "requeued": scheduler.requeued,
        "workers": [n.node_id for n in nodes if n.alive],
        "nodes": [n.info() for n in nodes],
    }


def _write_json_atomic(path: Path, data: dict) -> None:
    """Readers see the old snapshot or the new one, never half of one."""
    with atomic_text_file(path) as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


# -- the snapshotter -------------------------------------------------------------------------------

@dataclass
class _Pending:
    """One snapshot being assembled: the coordinator part, and node reports as they come."""

    number: int
    snapshot_id: str
    path: Path
    reason: str
    timestamp: float
    coordinator: dict
    expected: set[str]
    request_id: str = ""  # of its control message, which the nodes' reports answer
    reports: dict[str, dict] = field(default_factory=dict)
    complete: threading.Event = field(default_factory=threading.Event)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, report: NodeReport) -> None:
        with self.lock:
            if self.closed:
                return
            self.reports[report.node_id] = dict(report.state)
            if self.expected <= set(self.reports):
                self.complete.set()


class Snapshotter(MasterHooks):
    """Periodic and on-demand snapshots of a running `MasterNodeTransport`; the nodes'
    reports come in through its `node_report` hook."""

    def __init__(self, master: Any, *, directory: str | Path, interval: float = 30.0,
                 collect: float = 2.0, keep: int = 200, listing: int = 1000,
                 clock: Callable[[], float] = time.time) -> None:
        if interval < 0:
            raise ConfigError("snapshot interval must be 0 (off) or a positive number of seconds")
        if collect <= 0 or keep < 1 or listing < 0:
            raise ConfigError("collect must be positive, keep at least 1, listing 0 or more")
        self.master = master
        self.directory = Path(directory)
        self.interval = interval
        self.collect = collect
        self.keep = keep
        self.listing = listing
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._number = 0
        self._active: dict[int, _Pending] = {}
        self._done: dict[int, dict] = {}
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "Snapshotter":
        """Answer snapshot queries; take one every `interval` seconds unless it is 0."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._number = next_snapshot_number(p.name for p in self.directory.iterdir()) - 1
        except OSError as e:
            raise ConfigError(f"cannot use the snapshot directory {self.directory}: {e}") from e
        self.master.add_query(SNAPSHOT_QUERY, self._on_query)
        self.master.add_query(SNAPSHOT_STATUS_QUERY, self._on_status_query)
        self.master.add_hooks(self)
        if self.interval > 0:
            thread = threading.Thread(target=self._periodic, name="snapshots", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, *, timeout: float = 5.0) -> None:
        """Stop the timer; snapshots being collected are written with what they have."""
        self._stop.set()
        self.master.remove_hooks(self)
        with self._lock:
            pending = list(self._active.values())
        for p in pending:
            p.complete.set()
        for thread in list(self._threads):
            thread.join(timeout)

    # -- taking one --------------------------------------------------------------------------------

    def take(self, *, reason: str = "requested") -> Path:
        """Take a snapshot now and wait (bounded by `collect`) until it is written; its path."""
        with self.master._lock:  # the scheduler is the loop thread's: read it under its lock
            pending = self._begin(reason)
        self._collect_and_write(pending)
        return pending.path

    def _begin(self, reason: str) -> _Pending:
        """Record the coordinator's state and ask the nodes; the master's lock is held."""
        with self._lock:
            if len(self._active) >= _MAX_CONCURRENT:
                raise FabricError(f"{len(self._active)} snapshots are already being taken")
            self._number += 1
            number = self._number
        now = self._clock()
        scheduler = self.master.scheduler
        coordinator = coordinator_state(scheduler, master_id=self.master.master_id,
                                        limit=self.listing)
        name = snapshot_filename(number, now)
        pending = _Pending(number=number, snapshot_id=name[:-len(".json")],
                           path=self.directory / name, reason=reason, timestamp=now,
                           coordinator=coordinator, expected=set(coordinator["workers"]))
        with self._lock:
            self._active[number] = pending
        if not pending.expected:
            pending.complete.set()
        # the reports are taken on the master's loop, which waits for the lock held here
        pending.request_id = self.master.broadcast_control(
            "snapshot", {"snapshot_id": pending.snapshot_id})
        return pending

    def node_report(self, master: Any, report: NodeReport) -> None:
        """A node's answer, for the snapshot that asked (one being collected, if any)."""
        with self._lock:
            pending = [p for p in self._active.values() if p.request_id == report.request_id]
        for p in pending:
            p.add(report)

    def _collect_and_write(self, pending: _Pending) -> None:
        pending.complete.wait(self.collect)
        with pending.lock:
            pending.closed = True
            reports = dict(pending.reports)
        document = {
            "snapshot_id": pending.snapshot_id,
            "number": pending.number,
            "reason": pending.reason,
            "timestamp": pending.timestamp,
            "coordinator": pending.coordinator,
            "workers": dict(sorted(reports.items())),
            "missing_reports": sorted(pending.expected - set(reports)),
            "collected_for_s": round(self._clock() - pending.timestamp, 3),
        }
        error = ""
        try:
            _write_json_atomic(pending.path, document)
            self._prune()
            log.info("snapshot %d written to %s (%d of %d nodes reported)", pending.number,
                     pending.path, len(reports), len(pending.expected))
        except OSError as e:
            error = f"cannot write {pending.path}: {e}"
            log.error("snapshot %d: %s", pending.number, error)
        with self._lock:
            self._active.pop(pending.number, None)
            self._done[pending.number] = {
                "snapshot": pending.number, "path": str(pending.path), "written": not error,
                "error": error, "nodes_expected": len(pending.expected),
                "nodes_reported": len(reports)}
            while len(self._done) > _REMEMBERED:
                self._done.pop(min(self._done))

    def _prune(self) -> None:
        for name in expired_snapshots((p.name for p in self.directory.iterdir()), self.keep):
            try:
                (self.directory / name).unlink()
            except OSError as e:
                log.warning("could not delete old snapshot %s: %s", name, e)

    # -- timers and queries ------------------------------------------------------------------------

    def _periodic(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.take(reason="periodic")
            except Exception:  # a bad turn must not end periodic snapshots
                log.exception("periodic snapshot failed")

    def _on_query(self, params: dict) -> dict:
        """`snapshot` query (runs on the master's loop with its lock held): start one, return
        at once with where it will be written; the collection runs on its own thread."""
        if self._stop.is_set():
            raise FabricError("the master is stopping")
        pending = self._begin("requested")
        thread = threading.Thread(target=self._collect_and_write, args=(pending,),
                                  name=f"snapshot-{pending.number}", daemon=True)
        thread.start()
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        return {"snapshot": pending.number, "snapshot_id": pending.snapshot_id,
                "path": str(pending.path.resolve()), "collect_s": self.collect,
                "nodes_expected": len(pending.expected)}

    def _on_status_query(self, params: dict) -> dict:
        number = params.get("snapshot")
        if isinstance(number, bool) or not isinstance(number, int):
            raise ConfigError("snapshot_status needs params.snapshot: a snapshot number")
        with self._lock:
            done = self._done.get(number)
            active = self._active.get(number)
        if done is not None:
            return dict(done, path=str(Path(done["path"]).resolve()))
        if active is not None:
            return {"snapshot": number, "path": str(active.path.resolve()), "written": False,
                    "error": "", "nodes_expected": len(active.expected),
                    "nodes_reported": len(active.reports)}
        raise ConfigError(f"no snapshot {number} is known to this master")
