"""Dashboard: one client connection, the view it feeds, and the web server that shows it."""

from __future__ import annotations

import logging
import threading
from typing import Any

from core.topics import DEFAULT_ROOT
from core.url import BrokerUrl, parse_broker_url
from master.client import FabricClient
from master.dashboard.feed import DashboardFeed
from master.dashboard.server import DashboardServer
from master.dashboard.view import FabricView

__all__ = ["Dashboard"]

log = logging.getLogger("dashboard")


class Dashboard:
    """A live web view of the fabric, reading it over MQTT with its own credentials."""

    def __init__(self, *, broker_url: BrokerUrl | str | None, host: str = "127.0.0.1",
                 port: int = 8080, root: str = DEFAULT_ROOT, tls: Any = None) -> None:
        url = broker_url if isinstance(broker_url, BrokerUrl) else parse_broker_url(broker_url)
        self.view = FabricView(root=root, broker=str(url))
        self.server = DashboardServer(host=host, port=port, state=self.view.snapshot)
        self.client = FabricClient(broker_url=url, root=root, tls=tls)
        self.feed = DashboardFeed(self.client, self.view)
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def url(self) -> str:
        return self.server.url

    def start(self, *, timeout: float = 10.0) -> "Dashboard":
        """Connect to the broker (failing fast with the reason), then serve the page."""
        try:
            self.client.start(timeout=timeout)
            self.feed.start()
            self.server.start()
        except BaseException:
            self.server.stop()
            self.client.close()
            raise
        log.info("dashboard on %s reading %s (root %s)", self.url, self.view.broker,
                 self.view.root)
        return self

    def stop(self) -> None:
        """Stop serving and disconnect; a second call does nothing."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.feed.stop()
        self.server.stop()
        self.client.close()
