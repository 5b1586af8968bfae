"""`master-node result`: a task's result by its id, from any process, at any later time."""

from __future__ import annotations

import argparse
import json
import sys

from core import states
from core.errors import ConfigError, FabricTimeout
from core.topics import DEFAULT_ROOT
from core.url import BROKER_ENV
from master.commands.common import connect

NAME = "result"
HELP = "print a task's result by its id (e.g. one submitted with --no-wait)"
EXIT_PENDING = 3
DESCRIPTION = ("Print the result of the task with this id, as `submit` prints it: its value as "
               "JSON (or the whole outcome with --json). Without --wait it answers at once. "
               "Exit 0 when the task completed, 1 when it failed or was cancelled, "
               f"{EXIT_PENDING} when it is still queued or running (without --wait, or when "
               "--wait ran out of --timeout), 2 for an unknown id or a usage or connection error.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task_id", metavar="ID", help="the task's id")
    p.add_argument("--wait", action="store_true", help="wait for the task to end")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="with --wait: how long to wait for the task (default: until it ends)")
    p.add_argument("--json", action="store_true",
                   help="print the outcome (state, value, error, node, attempts) as JSON")
    p.add_argument("--broker", metavar="URL",
                   help=f"broker as mqtt://[user:password@]host:port (default: ${BROKER_ENV}, "
                        "else mqtt://127.0.0.1:1883)")
    p.add_argument("--root", default=DEFAULT_ROOT, help="topic root (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.timeout >= 0:
        raise ConfigError(f"--timeout must be 0 or more, got {args.timeout:g}")
    client = connect(argparse.Namespace(broker=args.broker, root=args.root, timeout=10.0))
    try:
        handle = client.handle(args.task_id)
        try:
            outcome = handle.outcome(args.timeout if args.wait else 0)
        except FabricTimeout:
            state = client.task(args.task_id)["state"]
            if args.json:
                print(json.dumps({"id": args.task_id, "state": state}))
            else:
                print(f"task {args.task_id} is still {state}", file=sys.stderr)
            return EXIT_PENDING
        if args.json:
            print(json.dumps(outcome.to_dict()))
        elif outcome.state == states.COMPLETED:
            print(json.dumps(outcome.value))
        else:
            print(json.dumps({"task_id": outcome.id, "state": outcome.state,
                              "error": outcome.error}), file=sys.stderr)
        return 0 if outcome.state == states.COMPLETED else 1
    finally:
        client.close()
