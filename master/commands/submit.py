"""`master-node submit`: submit one task by name and print its result."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from core.errors import FabricError
from master.commands.common import add_client_options, connect

NAME = "submit"
HELP = "submit a task by name and print its result"
DESCRIPTION = ("Submit one task and wait for its result, printed as JSON. Each ARG is parsed as "
               "JSON when it can be (5, 2.5, true, [1,2], {\"a\":1}), else taken as a string. "
               "Exit 0 when the task completed, 1 when it failed, 2 on a usage or connection error.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="task name, e.g. echo, sleep, primes, noop, lambda")
    p.add_argument("args", nargs="*", metavar="ARG", help="positional arguments")
    p.add_argument("--kwargs", default="{}", metavar="JSON", help="keyword arguments as JSON")
    p.add_argument("--priority", type=int, default=5, metavar="1-10",
                   help="1 least urgent, 10 most (default %(default)s)")
    p.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                   help="how long one run may take on its node; past it the task ends with "
                        "kind `timeout` (default: no limit). A thread worker is told to stop "
                        "and its late result dropped; it cannot be killed")
    p.add_argument("--max-attempts", type=int, default=0, metavar="N",
                   help="runs allowed before it ends failed (default: the master's)")
    p.add_argument("--no-wait", action="store_true", help="print the task id and return")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="how long to wait for the result (default: until it comes)")
    add_client_options(p)


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def run(args: argparse.Namespace) -> int:
    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as e:
        raise FabricError(f"--kwargs is not valid JSON: {e}") from e
    if not isinstance(kwargs, dict):
        raise FabricError("--kwargs must be a JSON object")
    client = connect(args)
    try:
        handle = client.submit(args.name, [_parse_arg(a) for a in args.args], kwargs,
                               priority=args.priority, max_attempts=args.max_attempts,
                               timeout=args.time_limit, ack_timeout=args.timeout)
        if args.no_wait:
            print(handle.id)
            return 0
        outcome = handle.outcome(args.wait)
        if outcome.state == "completed":
            print(json.dumps(outcome.value))
            return 0
        print(json.dumps({"task_id": outcome.id, "state": outcome.state, "error": outcome.error}),
              file=sys.stderr)
        return 1
    finally:
        client.close()
