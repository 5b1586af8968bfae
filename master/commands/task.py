"""`master-node task`: one task in full: its call, state, and every attempt."""

from __future__ import annotations

import argparse
import json
import time

from core import states
from master.commands.common import add_client_options, connect
from master.tables import format_table

NAME = "task"
HELP = "show one task: its call, state, value or error, and every attempt"
DESCRIPTION = ("Show everything the master knows about one task: name, arguments, priority, "
               "state, value or error, and each attempt with its node, start and end times and "
               "what ended it. Exit 2 for an unknown id.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task_id", metavar="ID", help="the task's id")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_client_options(p)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def run(args: argparse.Namespace) -> int:
    client = connect(args)
    try:
        info = client.task(args.task_id, timeout=args.timeout)
    finally:
        client.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    fields = [("id", info["id"]), ("name", info["name"]), ("args", json.dumps(info["args"])),
              ("kwargs", json.dumps(info["kwargs"])), ("priority", info["priority"]),
              ("state", info["state"]), ("node", info["node_id"] or "-"),
              ("attempts", f"{info['attempts']} (budget {info['max_attempts'] or 'default'})"),
              ("submitted", _when(info["submitted"])), ("finished", _when(info["finished"]))]
    if info["state"] == states.COMPLETED:
        fields.append(("value", json.dumps(info["value"])))
    elif info["error"]:
        fields.append(("error", f"{info['error'].get('kind')}: {info['error'].get('message')}"))
    print(format_table(("FIELD", "VALUE"), fields))
    rows = [(h["attempt"] or "-", h["node_id"] or "-", _when(h["started"]), _when(h["ended"]),
             h["outcome"], h["message"]) for h in info["history"]]
    if rows:
        print()
        print(format_table(("ATTEMPT", "NODE", "STARTED", "ENDED", "OUTCOME", "MESSAGE"), rows))
    return 0
