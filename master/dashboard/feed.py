"""DashboardFeed: reads the fabric over MQTT, as any client does, into a FabricView.

Retained topics (node statuses, job progress, pipeline states, the lease and the masters'
presence) arrive by subscription the moment they change; the master's counters, its view of
the nodes and its queue by priority are asked for once a second. Results are read only for
their failures: a batch without the word "error" in it is passed over undecoded.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from core import codec
from core.errors import DecodeError, FabricError
from core.topics import Topics
from master.client import FabricClient
from master.dashboard.queue_query import QUEUE_QUERY
from master.dashboard.view import FabricView

__all__ = ["DashboardFeed"]

log = logging.getLogger(__name__)


class DashboardFeed:
    """Subscriptions and once-a-second queries that keep a FabricView current."""

    def __init__(self, client: FabricClient, view: FabricView, *, interval: float = 1.0,
                 query_timeout: float = 2.0) -> None:
        self.client = client
        self.view = view
        self.topics: Topics = client.topics
        self.interval = interval
        self.query_timeout = query_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="dashboard-poll", daemon=True)

    def start(self) -> "DashboardFeed":
        t = self.topics
        self._watch(t.all_node_status, 1, self.view.node_status)
        self._watch(f"{t.root}/jobs/+/progress", 1, self.view.job_progress)
        self._watch(f"{t.root}/pipelines/+/state", 1, self.view.pipeline_state)
        self._watch(t.all_master_presence, 1, self.view.master_presence)
        self.client.subscribe(t.master_lease, self._on_lease)
        self.client.subscribe(f"{t.root}/events/#", self._on_event)
        self.client.subscribe(t.all_results, self._on_results)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.query_timeout * 3 + 1)

    # -- subscriptions ----------------------------------------------------------------------------

    def _decode(self, payload: bytes) -> dict[str, Any] | None:
        """A retained JSON map; None for a cleared topic; DecodeError for anything else."""
        if not payload:
            return None
        return codec.decode(payload)

    def _watch(self, topic_filter: str, level: int,
               apply: Callable[[str, dict[str, Any] | None], None]) -> None:
        def handler(topic: str, payload: bytes) -> None:
            name = self.topics.level(topic, level)
            if not name:
                return
            try:
                apply(name, self._decode(payload))
            except DecodeError:
                self.view.ignore()
        self.client.subscribe(topic_filter, handler)

    def _on_lease(self, _topic: str, payload: bytes) -> None:
        try:
            self.view.lease(self._decode(payload))
        except DecodeError:
            self.view.ignore()

    def _on_event(self, topic: str, payload: bytes) -> None:
        name = topic[len(self.topics.root) + len("/events/"):]
        try:
            data = self._decode(payload) or {}
        except DecodeError:
            self.view.ignore()
            return
        self.view.event(name, data)

    def _on_results(self, topic: str, payload: bytes) -> None:
        if b"error" not in payload:  # no failure in this batch: not worth decoding
            return
        node_id = self.topics.level(topic, 1) or "?"
        try:
            batch = codec.decode(payload)
        except DecodeError:
            self.view.ignore()
            return
        results = batch.get("results")
        for result in results if isinstance(results, list) else ():
            if isinstance(result, dict) and result.get("ok") is False:
                self.view.failed_result(node_id, str(result.get("id", "?")),
                                        result.get("error"), result.get("ts"))

    # -- queries ----------------------------------------------------------------------------------

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.view.broker_connected(self.client.connected)
            if self.client.connected:
                self._poll_once()
            self._stop.wait(self.interval)

    def _poll_once(self) -> None:
        try:
            self.view.master_status(self.client.query("status", timeout=self.query_timeout))
        except FabricError as e:
            self.view.master_status(None, error=str(e))
            return  # the master is away: the other questions would wait as long
        try:
            self.view.master_nodes(self.client.query("nodes", timeout=self.query_timeout))
        except FabricError as e:
            log.debug("nodes query: %s", e)
        try:
            self.view.queue(self.client.query(QUEUE_QUERY, timeout=self.query_timeout))
        except FabricError as e:
            self.view.queue(None, note=f"the master does not say the queue by priority ({e}); "
                                       "total queued from its status")
