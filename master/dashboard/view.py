"""FabricView: what the dashboard knows of the fabric, built from the messages it reads.

Pure bookkeeping, no network: the feed hands it decoded messages and query answers, the web
server asks it for a JSON-ready snapshot. Everything is bounded (latest failures, events,
throughput samples), so a dashboard left open for weeks holds the same few kilobytes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from core import states
from core.defaults import DEFAULT_HEARTBEAT
__all__ = ["FabricView", "HISTORY_SECONDS", "MAX_FAILURES"]

HISTORY_SECONDS = 300     # throughput samples kept (one a second)
MAX_FAILURES = 25         # latest failed results kept
MAX_EVENTS = 25           # latest pipeline and job events kept


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class FabricView:
    """Thread-safe state of the fabric as one client sees it."""

    def __init__(self, *, root: str, broker: str, clock: Any = time.time) -> None:
        self.root = root
        self.broker = broker
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: dict[str, dict[str, Any]] = {}
        self._node_seen: dict[str, float] = {}
        self._master_nodes: dict[str, dict[str, Any]] = {}
        self._master: dict[str, Any] | None = None
        self._master_seen: float | None = None
        self._master_error = ""
        self._queue: dict[str, Any] | None = None
        self._queue_note = "waiting for the master"
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=HISTORY_SECONDS + 1)
        self._jobs: dict[str, dict[str, Any]] = {}
        self._job_rates: dict[str, tuple[float, float, float]] = {}  # ts, tested, rate
        self._pipelines: dict[str, dict[str, Any]] = {}
        self._failures: deque[dict[str, Any]] = deque(maxlen=MAX_FAILURES)
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._lease: dict[str, Any] | None = None
        self._masters: dict[str, dict[str, Any]] = {}
        self._broker_connected = False
        self.ignored = 0  # messages that were not what their topic promised

    # -- what the feed reports ------------------------------------------------------------------

    def broker_connected(self, connected: bool) -> None:
        with self._lock:
            self._broker_connected = connected

    def node_status(self, node_id: str, status: dict[str, Any] | None) -> None:
        """A node's retained status (None: cleared from the broker)."""
        with self._lock:
            if status is None:
                self._nodes.pop(node_id, None)
                self._node_seen.pop(node_id, None)
            else:
                self._nodes[node_id] = status
                self._node_seen[node_id] = self._clock()

    def master_nodes(self, nodes: list[dict[str, Any]]) -> None:
        """The master's own view of its nodes (the `nodes` query): what each holds."""
        with self._lock:
            self._master_nodes = {n["node_id"]: n for n in nodes
                                  if isinstance(n, dict) and isinstance(n.get("node_id"), str)}

    def master_status(self, status: dict[str, Any] | None, *, error: str = "") -> None:
        """The master's counters (the `status` query), or why it did not answer."""
        now = self._clock()
        with self._lock:
            self._master_error = error
            if status is None:
                return
            self._master = status
            self._master_seen = now
            completed = _number(status.get("completed"))
            failed = _number(status.get("failed"))
            if completed is not None and failed is not None:
                self._samples.append((now, completed, failed))

    def queue(self, queue: dict[str, Any] | None, *, note: str = "") -> None:
        """Queued tasks by priority (the `queue` query), or why they are not known."""
        with self._lock:
            self._queue = queue
            self._queue_note = note

    def job_progress(self, job_id: str, progress: dict[str, Any] | None) -> None:
        now = self._clock()
        with self._lock:
            if progress is None:
                self._jobs.pop(job_id, None)
                self._job_rates.pop(job_id, None)
                return
            self._jobs[job_id] = progress
            tested = _number(progress.get("numbers_tested"))
            previous = self._job_rates.get(job_id)
            rate = _number(progress.get("rate")) or 0.0
            if tested is not None and previous is not None and now > previous[0]:
                rate = max(0.0, (tested - previous[1]) / (now - previous[0]))
            if tested is not None:
                self._job_rates[job_id] = (now, tested, rate)

    def pipeline_state(self, name: str, state: dict[str, Any] | None) -> None:
        with self._lock:
            if state is None:
                self._pipelines.pop(name, None)
            else:
                self._pipelines[name] = state

    def failed_result(self, node_id: str, task_id: str, error: Any, ts: Any) -> None:
        """A result that came back failed: who, which task, and the reason given."""
        reason = error if isinstance(error, dict) else {"message": str(error)}
        entry = {"node_id": node_id, "task_id": task_id,
                 "kind": str(reason.get("kind") or reason.get("type") or "error"),
                 "message": str(reason.get("message") or reason.get("error") or "")[:300],
                 "ts": _number(ts) or self._clock()}
        with self._lock:
            self._failures.appendleft(entry)

    def event(self, name: str, data: dict[str, Any]) -> None:
        entry = {"event": name, "ts": self._clock(),
                 **{k: data[k] for k in ("pipeline", "job", "run_id", "error") if k in data}}
        with self._lock:
            self._events.appendleft(entry)

    def lease(self, lease: dict[str, Any] | None) -> None:
        with self._lock:
            self._lease = lease

    def master_presence(self, master_id: str, presence: dict[str, Any] | None) -> None:
        with self._lock:
            if presence is None:
                self._masters.pop(master_id, None)
            else:
                self._masters[master_id] = presence

    def ignore(self) -> None:
        with self._lock:
            self.ignored += 1

    # -- what the page shows --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything the page draws, as plain JSON values."""
        now = self._clock()
        with self._lock:
            return {
                "now": now, "root": self.root, "broker": self.broker,
                "broker_connected": self._broker_connected,
                "master": self._master_view(now),
                "nodes": self._nodes_view(now),
                "queue": self._queue, "queue_note": self._queue_note,
                "throughput": self._throughput(),
                "jobs": self._jobs_view(),
                "pipelines": [dict(state, name=name)
                              for name, state in sorted(self._pipelines.items())],
                "failures": list(self._failures),
                "events": list(self._events),
                "lease": self._lease,
                "masters": [dict(p, master_id=m) for m, p in sorted(self._masters.items())],
                "ignored": self.ignored,
            }

    def _master_view(self, now: float) -> dict[str, Any]:
        view = dict(self._master or {})
        view["answering"] = self._master_seen is not None and now - self._master_seen < 5.0
        view["age"] = None if self._master_seen is None else round(now - self._master_seen, 1)
        view["error"] = self._master_error
        return view

    def _nodes_view(self, now: float) -> list[dict[str, Any]]:
        out = []
        for node_id in sorted(set(self._nodes) | set(self._master_nodes)):
            status = self._nodes.get(node_id, {})
            known = self._master_nodes.get(node_id, {})
            node = {**known, **status, "node_id": node_id}
            seen = self._node_seen.get(node_id)
            age = None if seen is None else max(0.0, now - seen)
            heartbeat = _number(node.get("heartbeat")) or DEFAULT_HEARTBEAT
            state = str(node.get("status") or "unknown")
            silent = age is not None and state not in states.GONE_STATES and age > 3 * heartbeat + 1
            node.update({"status": state, "age": None if age is None else round(age, 1),
                         "in_flight": known.get("in_flight"),
                         "dead": state == states.DEAD or silent, "silent": silent})
            out.append(node)
        return out

    def _throughput(self) -> list[dict[str, float]]:
        """Tasks finished per second between consecutive samples of the master's counters."""
        points = []
        samples = list(self._samples)
        for (t0, c0, f0), (t1, c1, f1) in zip(samples, samples[1:]):
            if t1 > t0:
                points.append({"ts": round(t1, 3),
                               "completed": max(0.0, round((c1 - c0) / (t1 - t0), 1)),
                               "failed": max(0.0, round((f1 - f0) / (t1 - t0), 1))})
        return points[-HISTORY_SECONDS:]

    def _jobs_view(self) -> list[dict[str, Any]]:
        out = []
        for job_id, progress in sorted(self._jobs.items()):
            rate = self._job_rates.get(job_id)
            percent = _number(progress.get("percent"))
            out.append(dict(progress, job_id=job_id,
                            percent=0.0 if percent is None else max(0.0, min(100.0, percent)),
                            live_rate=round(rate[2], 1) if rate else None))
        return out
