"""`master-node status`: the master's counters, as a table or JSON."""

from __future__ import annotations

import argparse
import json

from master.commands.common import add_client_options, ask
from master.tables import format_table

NAME = "status"
HELP = "show the master's counters"
DESCRIPTION = ("Show the master's queue depth, tasks in flight, completed, failed, cancelled, "
               "expired, its throughput over the last minute, uptime and nodes. The counters and "
               "the uptime are kept in the journal: a restart of the master goes on from them.")

_FIELDS = ("master_id", "status", "queued", "in_flight", "completed", "failed", "cancelled",
           "duplicates", "rejected", "expired", "throughput", "uptime", "nodes_ready",
           "nodes_total")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_client_options(p)


def run(args: argparse.Namespace) -> int:
    status = ask(args, "status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_table(("FIELD", "VALUE"), [(k, _shown(k, status.get(k))) for k in _FIELDS]))
    return 0


def _shown(field: str, value: object) -> object:
    """A value as people read it: the rate with its unit, the uptime as a duration."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    if field == "throughput":
        return f"{value:g} tasks/s (last minute)"
    if field == "uptime":
        from master.retention import format_duration
        return format_duration(value) if value >= 1 else f"{value:g}s"
    return value
