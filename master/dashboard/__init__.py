"""A live web dashboard of the fabric, served by the fabric itself and fed over MQTT."""

from master.dashboard.app import Dashboard
from master.dashboard.feed import DashboardFeed
from master.dashboard.queue_query import QUEUE_QUERY, queue_summary, register_queue_query
from master.dashboard.server import DashboardServer, parse_listen
from master.dashboard.view import FabricView

__all__ = ["Dashboard", "DashboardFeed", "DashboardServer", "FabricView", "QUEUE_QUERY",
           "parse_listen", "queue_summary", "register_queue_query"]
