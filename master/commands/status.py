"""`master-node status`: the master's counters, as a table or JSON."""

from __future__ import annotations

import argparse
import json

from master.commands.common import add_client_options, ask
from master.tables import format_table

NAME = "status"
HELP = "show the master's counters"
DESCRIPTION = "Show the master's queue depth, tasks in flight, completed, failed and nodes."

_FIELDS = ("master_id", "status", "queued", "in_flight", "completed", "failed", "duplicates",
           "rejected", "nodes_ready", "nodes_total")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_client_options(p)


def run(args: argparse.Namespace) -> int:
    status = ask(args, "status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_table(("FIELD", "VALUE"), [(k, status.get(k)) for k in _FIELDS]))
    return 0
