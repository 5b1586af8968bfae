"""The master's `queue` query: how many tasks wait and run at each priority, by task name.

Registered on the master by `master-node serve`, answered on its loop from the scheduler's
active tasks (queued or in flight; finished ones have left that table), so its cost is one
pass over the work at hand, paid only while someone asks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from master.scheduler import QUEUED, RUNNING

__all__ = ["QUEUE_QUERY", "register_queue_query", "queue_summary"]

QUEUE_QUERY = "queue"
_TOP_NAMES = 10


def queue_summary(records: Any) -> dict[str, Any]:
    """{"queued", "running", "by_priority": [{"priority", "queued", "running"}], "by_name"}
    for an iterable of the scheduler's task records; most urgent priority first."""
    queued: Counter[int] = Counter()
    running: Counter[int] = Counter()
    names: Counter[str] = Counter()
    for record in records:
        if record.state == QUEUED:
            queued[record.spec.priority] += 1
            names[record.spec.name] += 1
        elif record.state == RUNNING:
            running[record.spec.priority] += 1
    priorities = sorted(set(queued) | set(running), reverse=True)
    return {"queued": sum(queued.values()), "running": sum(running.values()),
            "by_priority": [{"priority": p, "queued": queued[p], "running": running[p]}
                            for p in priorities],
            "by_name": [{"name": n, "queued": c} for n, c in names.most_common(_TOP_NAMES)]}


def register_queue_query(master: Any) -> None:
    """Answer `queue` queries on this master (a MasterNodeTransport)."""
    master.add_query(QUEUE_QUERY, lambda _params: queue_summary(master.scheduler.tasks.values()))
