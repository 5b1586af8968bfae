"""Taking over as the active replicated master: the transport it runs, and what the live
nodes hold, so those tasks stay in flight where they are instead of being sent again."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable

from core import states
from core.protocol import NodeReport
from master.hooks import MasterHooks
from master.transport import MasterNodeTransport

if TYPE_CHECKING:
    from master.replica import ReplicaOptions

__all__ = ["active_transport", "reconcile"]

log = logging.getLogger("master.replica")

def active_transport(options: ReplicaOptions, *, master_id: str, epoch: int
                     ) -> MasterNodeTransport:
    """The master that runs on this replica's journal copy while it holds `epoch`."""
    transport = MasterNodeTransport(
        broker_url=options.broker_url, root=options.root, state_dir=options.state_dir,
        master_id=master_id, max_attempts=options.max_attempts,
        max_queued=options.max_queued, node_timeout=options.node_timeout,
        keepalive=options.keepalive, tls=options.tls, retry=options.retry,
        rate_limits=options.rate_limits, result_ttl=options.result_ttl,
        forget_nodes_after=options.forget_nodes_after)
    transport.epoch = epoch
    return transport


class _HeldReports(MasterHooks):
    """The nodes' answers to one `snapshot` control message (those before its request id is
    known are kept until it is)."""

    def __init__(self, alive: set[str]) -> None:
        self.alive = alive
        self.request_id: str | None = None
        self.reports: dict[str, NodeReport] = {}
        self.answered = threading.Event()
        self._early: list[NodeReport] = []
        self._lock = threading.Lock()

    def asked(self, request_id: str) -> None:
        with self._lock:
            self.request_id = request_id
            early, self._early = self._early, []
            for report in early:
                self._take(report)

    def node_report(self, master: MasterNodeTransport, report: NodeReport) -> None:
        with self._lock:
            if self.request_id is None:
                self._early.append(report)
            else:
                self._take(report)

    def taken(self) -> dict[str, NodeReport]:
        with self._lock:
            return dict(self.reports)

    def _take(self, report: NodeReport) -> None:
        if report.request_id != self.request_id:
            return
        self.reports[report.node_id] = report
        if self.alive <= set(self.reports):
            self.answered.set()


def _alive(transport: MasterNodeTransport) -> set[str]:
    return {node for state in states.LIVE_STATES for node in transport.get_nodes_by_status(state)}


def reconcile(transport: MasterNodeTransport, *, expected: set[str], timeout: float,
              clock: Callable[[], float], stopping: threading.Event,
              deposed: threading.Event) -> None:
    """Ask the live nodes (those `expected` to have reconnected, within `timeout`) what
    they hold; those tasks stay in flight where they are."""
    deadline = clock() + timeout
    while clock() < deadline and not deposed.is_set():
        if expected <= _alive(transport):
            break
        stopping.wait(0.02)
    alive = _alive(transport)
    held = _HeldReports(alive)
    if alive:
        transport.add_hooks(held)
        try:
            held.asked(transport.broadcast_control("snapshot", {"reason": "take-over"}))
            held.answered.wait(max(0.0, deadline - clock()) + 0.5)
        finally:
            transport.remove_hooks(held)
    reports = held.taken()
    adopted = 0
    for node_id, report in reports.items():
        tasks = report.state.get("held")
        if isinstance(tasks, list) and all(isinstance(t, str) for t in tasks):
            adopted += transport.adopt(node_id, tasks)
    log.info("take-over: %d of %d nodes said what they hold; %d tasks stay in flight on them",
             len(reports), len(alive), adopted)
