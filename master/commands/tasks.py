"""`master-node tasks`: the latest tasks the master journalled, filtered by state or name."""

from __future__ import annotations

import argparse
import json

from core import states
from core.errors import ConfigError
from master.commands.common import add_client_options, connect
from master.tables import format_age, format_table

NAME = "tasks"
HELP = "list the latest tasks (by state, by name)"
STATES = states.TASK_STATES
DESCRIPTION = ("List the latest tasks, newest first: id, name, state, node, attempts, when "
               "submitted and finished. Queued and running tasks are all searched; with "
               "another filter, the latest 200,000 tasks are (the master answers on its own "
               "loop and must stay quick). `master-node task ID` shows any task in full.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", choices=STATES, help="only tasks in this state")
    p.add_argument("--name", help="only tasks of this name")
    p.add_argument("--limit", type=int, default=50, metavar="N",
                   help="at most N tasks (1-10000, default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_client_options(p)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 10_000:
        raise ConfigError(f"--limit must be 1-10000, got {args.limit}")
    client = connect(args)
    try:
        tasks = client.tasks(state=args.state, name=args.name, limit=args.limit,
                             timeout=args.timeout)
    finally:
        client.close()
    if args.json:
        print(json.dumps(tasks, indent=2))
        return 0
    rows = [(t["id"], t["name"], t["state"], t["node_id"] or "-", t["attempts"],
             format_age(t["submitted"]), format_age(t["finished"] or 0)) for t in tasks]
    print(format_table(("ID", "NAME", "STATE", "NODE", "ATTEMPTS", "SUBMITTED", "FINISHED"),
                       rows) if rows else "no tasks")
    return 0
