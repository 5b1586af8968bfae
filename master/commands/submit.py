"""`master-node submit`: submit one task by name and print its result."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from core import states
from core.errors import ConfigError, FabricError
from core.protocol import MAX_ATTEMPTS
from master.commands.common import add_client_options, connect
from master.retry_policy import check_delay, parse_retry_on
from master.start_time import not_before

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
    p.add_argument("--retries", type=int, default=None, metavar="N",
                   help="retries after its first run, i.e. --max-attempts N+1")
    p.add_argument("--backoff", type=float, default=None, metavar="SECONDS",
                   help="wait before its first retry, doubled for each next one, less a "
                        "random part of up to a quarter (default: the master's; 0 at once)")
    p.add_argument("--backoff-max", type=float, default=None, metavar="SECONDS",
                   help="the longest wait between two runs (default: the master's)")
    p.add_argument("--retry-on", default=None, metavar="KINDS",
                   help="error kinds that are retried, comma-separated: e.g. exception,timeout; "
                        "`error` is every kind another run may cure, `none` retries nothing "
                        "(default: the master's, normally `error`)")
    p.add_argument("--countdown", type=float, default=0.0, metavar="SECONDS",
                   help="start no earlier than SECONDS from now")
    p.add_argument("--eta", default=None, metavar="TIME",
                   help="start no earlier than TIME: ISO 8601 (2026-01-01T09:30:00Z; local "
                        "time without a zone) or epoch seconds")
    p.add_argument("--no-wait", action="store_true", help="print the task id and return")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="how long to wait for the result (default: until it comes)")
    add_client_options(p)


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _policy(args: argparse.Namespace) -> dict[str, Any]:
    """The retry and start-time keywords of FabricClient.submit, checked."""
    max_attempts = args.max_attempts
    if args.retries is not None:
        if max_attempts:
            raise ConfigError("give --retries or --max-attempts, not both")
        if not 0 <= args.retries < MAX_ATTEMPTS:
            raise ConfigError(f"--retries {args.retries}: must be 0-{MAX_ATTEMPTS - 1}")
        max_attempts = args.retries + 1
    for flag, value in (("--backoff", args.backoff), ("--backoff-max", args.backoff_max)):
        if value is not None:
            check_delay(flag, value)
    not_before(countdown=args.countdown, eta=args.eta, now=0.0)  # checked; made at submit
    return {"max_attempts": max_attempts, "backoff": args.backoff,
            "backoff_max": args.backoff_max, "countdown": args.countdown, "eta": args.eta,
            "retry_on": None if args.retry_on is None else parse_retry_on(args.retry_on)}


def run(args: argparse.Namespace) -> int:
    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as e:
        raise FabricError(f"--kwargs is not valid JSON: {e}") from e
    if not isinstance(kwargs, dict):
        raise FabricError("--kwargs must be a JSON object")
    policy = _policy(args)  # a bad value stops here, before any connection
    client = connect(args)
    try:
        handle = client.submit(args.name, [_parse_arg(a) for a in args.args], kwargs,
                               priority=args.priority, timeout=args.time_limit,
                               ack_timeout=args.timeout, **policy)
        if args.no_wait:
            print(handle.id)
            return 0
        outcome = handle.outcome(args.wait)
        if outcome.state == states.COMPLETED:
            print(json.dumps(outcome.value))
            return 0
        print(json.dumps({"task_id": outcome.id, "state": outcome.state, "error": outcome.error}),
              file=sys.stderr)
        return 1
    finally:
        client.close()
