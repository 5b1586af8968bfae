"""`master-node nodes`: the nodes the master knows, as a table or JSON."""

from __future__ import annotations

import argparse
import json

from master.commands.common import add_client_options, ask
from master.tables import format_age, format_table

NAME = "nodes"
HELP = "list the nodes the master knows"
DESCRIPTION = "List every node the master knows: status, kind, capacity, work held, counters."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_client_options(p)


def run(args: argparse.Namespace) -> int:
    nodes = ask(args, "nodes")
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    rows = [(n["node_id"], n["status"], n["kind"], n["capacity"], n["in_flight"], n["workload"],
             n["tasks_done"], n["tasks_failed"], format_age(n["last_seen"]))
            for n in sorted(nodes, key=lambda n: n["node_id"])]
    print(format_table(("NODE", "STATUS", "KIND", "CAPACITY", "IN FLIGHT", "HELD", "DONE",
                        "FAILED", "LAST SEEN"), rows) if rows else "no nodes")
    return 0
