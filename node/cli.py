"""`compute-node`: run a compute node on this machine."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from core.errors import FabricError
from core.defaults import DEFAULT_HEARTBEAT
from core.logs import configure_logging
from core.protocol import MAX_HEARTBEAT  # what a node's status may say
from core.runtime import tune_for_messaging
from core.topics import DEFAULT_ROOT
from core.credentials import add_security_options, broker_from_args, tls_from_args
from core.url import BROKER_ENV, parse_broker_url
from node.process_pool import POOLS

__all__ = ["main", "build_parser", "MIN_HEARTBEAT", "MAX_HEARTBEAT"]

MIN_HEARTBEAT = 0.05  # below this the node floods the broker with statuses


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compute-node",
        description="Join the compute fabric: take prioritised tasks from the master over MQTT, "
                    "run them, send results back. Stops cleanly on Ctrl-C or SIGTERM, handing "
                    "back tasks it has not started.")
    parser.add_argument("--broker", metavar="URL",
                        help=f"broker as mqtt://[user:password@]host:port (default: ${BROKER_ENV}, "
                             "else mqtt://127.0.0.1:1883)")
    parser.add_argument("--id", dest="node_id", metavar="ID",
                        help="node id (default: <hostname>-<n>, stable across restarts)")
    parser.add_argument("--capacity", type=int, default=1, metavar="N",
                        help="tasks run at once, one worker each (default 1; for CPU-bound work "
                             "use --pool process, or one thread-pool node per core)")
    parser.add_argument("--pool", choices=POOLS, default="thread",
                        help="where tasks run. thread (default): on worker threads of this "
                             "process, the cheapest per task; a thread cannot be stopped from "
                             "outside, so a cancelled or timed-out task is told through its "
                             "context (task_context.cancelled()) and its late result dropped, "
                             "but a task that never looks keeps its slot until it returns. "
                             "process: each slot is a worker process forked from the node "
                             "(Linux), reused between tasks; a task past its time limit (master-node "
                             "submit --time-limit) or cancelled is killed within a second and its slot is free at "
                             "once: the only way to stop a runaway task. Costs about 20 "
                             "microseconds more per task and one process per slot")
    parser.add_argument("--prefetch", type=int, default=None, metavar="N",
                        help="extra tasks held ready beyond capacity (default: adaptive, about 50 ms "
                             "of work: many tiny tasks, few slow ones)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="topic root (default %(default)s)")
    parser.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT, metavar="SECONDS",
                        help="heartbeat interval (default %(default)s)")
    parser.add_argument("--task", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="register a plain function as a task named after it (repeatable)")
    parser.add_argument("--lambda", dest="lambdas", action="append", default=[],
                        metavar="MODULE:FUNCTION",
                        help="register a lambda_handler(event, context) run in a worker process "
                             "with memory and time limits (repeatable)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    add_security_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level)
    except ValueError:
        parser.error(f"--log-level {args.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    from node.transport import ComputeNodeTransport
    from node.builtin_tasks import with_builtins
    from node.registry import default_registry, load_task
    from node.lambda_tasks import attach_lambdas

    try:
        if args.capacity < 1:
            raise FabricError("--capacity must be at least 1")
        if args.prefetch is not None and args.prefetch < 0:
            raise FabricError("--prefetch must be 0 or more")
        if not MIN_HEARTBEAT <= args.heartbeat <= MAX_HEARTBEAT:  # NaN fails too
            raise FabricError(f"--heartbeat {args.heartbeat:g}: must be between "
                              f"{MIN_HEARTBEAT:g} and {MAX_HEARTBEAT:g} seconds")
        broker = broker_from_args(parse_broker_url(args.broker), args)
        tls = tls_from_args(args)
        registry = with_builtins(default_registry)
        for spec in args.task:
            load_task(spec, registry=registry)
        runner = attach_lambdas(registry, args.lambdas)
        tune_for_messaging()
        node = ComputeNodeTransport(
            broker_url=broker, tls=tls, node_id=args.node_id, root=args.root,
            capacity=args.capacity, prefetch=args.prefetch, heartbeat=args.heartbeat,
            registry=registry, lambdas=lambda: runner.names, pool=args.pool)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        node.start()
        log = logging.getLogger("compute-node")
        log.info("node %s ready on %s (capacity %d, %s pool)", node.node_id, node.broker,
                 node.capacity, node.pool)
        while not stop.wait(1.0):
            pass
        log.info("node %s stopping: handing back unstarted tasks, finishing running ones",
                 node.node_id)
        node.stop(graceful=True)
        if runner is not None:
            runner.close()
        log.info("node %s stopped", node.node_id)
        return 0
    except FabricError as e:
        print(f"compute-node: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
