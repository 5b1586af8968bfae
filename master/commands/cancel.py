"""`master-node cancel`: cancel tasks by id, queued or running."""

from __future__ import annotations

import argparse
import json

from core import states
from master.commands.common import add_client_options, connect

NAME = "cancel"
HELP = "cancel tasks by id (a queued one never starts, a running one is stopped)"
DESCRIPTION = ("Cancel tasks: a queued task never starts; a running one is stopped on its node "
               "(a thread worker tells the task, which stops at its next check or wait; its "
               "result is dropped either way); each ends `cancelled`. A task that had ended "
               "already is left as it is, and said so. Exit 0 if every id was cancelled, 1 if "
               "some had ended already or are unknown.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task_ids", nargs="+", metavar="ID", help="ids of the tasks to cancel")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    add_client_options(p)


def run(args: argparse.Namespace) -> int:
    client = connect(args)
    try:
        verdicts = client.cancel(args.task_ids, timeout=args.timeout)
    finally:
        client.close()
    if args.json:
        print(json.dumps(verdicts, indent=2))
    for v in verdicts if not args.json else ():
        if v["was"] in (states.QUEUED, states.RUNNING):
            where = f" on node {v['node_id']}" if v.get("node_id") else ""
            print(f"{v['id']}: cancelled (it was {v['was']}{where})")
        elif v["was"] == states.UNKNOWN:
            print(f"{v['id']}: no such task")
        else:
            print(f"{v['id']}: already {v['was']}; nothing changed")
    return 0 if all(v["was"] in (states.QUEUED, states.RUNNING) for v in verdicts) else 1
