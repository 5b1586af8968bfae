"""`master-node serve`: run the master (and the embedded broker)."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

from core.credentials import add_security_options
from core.defaults import (DEFAULT_LEASE_TTL, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_QUEUED,
                           DEFAULT_NODE_TIMEOUT)
from core.topics import DEFAULT_ROOT

NAME = "serve"
HELP = "run the master (and the embedded broker)"
DESCRIPTION = ("Run the master. With no --broker it starts the embedded MQTT broker configured by "
               "broker.conf (mosquitto syntax). Stops cleanly on Ctrl-C or SIGTERM; queued and "
               "in-flight work survives in the journal, even a kill -9. With --replica, run "
               "several masters (each with its own --id and --state, all on one --broker): "
               "one is active, the others keep a copy of its journal and take over, with "
               "nothing it acknowledged lost, when it dies or stops renewing its lease. Without "
               "--replica one master serves a root: a second one on the same root or --state "
               "exits with status 2, naming the first.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", metavar="URL",
                   help="use this broker instead of starting the embedded one")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="broker config in mosquitto syntax (default: ./broker.conf if present, "
                        "else a loopback listener on 1883)")
    p.add_argument("--port", type=int, metavar="PORT",
                   help="override the embedded broker's listener port")
    p.add_argument("--state", type=Path, default=Path("state"), metavar="DIR",
                   help="directory of the durable journal (default %(default)s)")
    p.add_argument("--root", default=DEFAULT_ROOT, help="topic root (default %(default)s)")
    p.add_argument("--node-timeout", type=float, default=DEFAULT_NODE_TIMEOUT, metavar="SECONDS",
                   help="a node silent this long is dead (default %(default)s)")
    p.add_argument("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS, metavar="N",
                   help="a task that failed or lost its node N times ends failed (default %(default)s)")
    p.add_argument("--backoff", type=float, default=0.0, metavar="SECONDS",
                   help="a failed task waits this long before its first retry, doubled for "
                        "each next one, less a random part of up to a quarter; a task's own "
                        "--backoff wins (default %(default)s: retry at once)")
    p.add_argument("--backoff-max", type=float, default=300.0, metavar="SECONDS",
                   help="the longest wait between two runs of a task (default %(default)s)")
    p.add_argument("--retry-on", default="error", metavar="KINDS",
                   help="error kinds retried, comma-separated (e.g. error,timeout); `error` is "
                        "every kind another run may cure (all but timeout, unknown_task, "
                        "bad_request, ...), `none` retries nothing; a lost node is always "
                        "retried (default %(default)s)")
    p.add_argument("--rate-limit", action="append", default=[], metavar="NAME=N/s",
                   help="start at most N tasks named NAME per second (or /m, /h), e.g. "
                        "primes=100/s; repeat it for more names")
    p.add_argument("--max-queued", type=int, default=DEFAULT_MAX_QUEUED, metavar="N",
                   help="queue bound; submitters are slowed past it (default %(default)s)")
    p.add_argument("--pipelines", type=Path, metavar="FILE",
                   help="run the pipelines of this TOML file (see examples/pipelines.toml); "
                        "it is validated first and a bad file stops serve")
    p.add_argument("--allow-remote-anonymous", action="store_true",
                   help="let the embedded broker accept anonymous clients on a listener other "
                        "machines can reach (refused by default; a warning is printed)")
    p.add_argument("--id", dest="master_id", default="master", metavar="ID",
                   help="master id (default %(default)s)")
    p.add_argument("--snapshots", type=Path, default=None, metavar="DIR",
                   help="where snapshot_<n>_<time>.json files go (default: snapshots beside the "
                        "--state directory, i.e. ./snapshots by default; the newest 200 are kept)")
    p.add_argument("--snapshot-interval", type=float, default=30.0, metavar="SECONDS",
                   help="take a snapshot every SECONDS (default %(default)s; 0 takes them only "
                        "on `master-node snapshot`)")
    p.add_argument("--replica", action="store_true",
                   help="one of replicated masters: stand by, copying the active master's "
                        "journal, and take over when its lease lapses (the first to find no "
                        "active master becomes it). Needs --broker: the broker must outlive "
                        "each master; --pipelines is not replicated and is refused")
    p.add_argument("--dashboard", metavar="HOST:PORT",
                   help="also serve the live web dashboard there (e.g. 127.0.0.1:8080; the "
                        "same page as `master-node dashboard`)")
    p.add_argument("--lease-ttl", type=float, default=DEFAULT_LEASE_TTL, metavar="SECONDS",
                   help="with --replica: the active master renews its lease every third of "
                        "this; a standby takes over when the lease lapses or its holder's "
                        "connection drops (default %(default)s; the same on every master)")
    p.add_argument("--result-ttl", default="24h", metavar="DURATION",
                   help="keep a finished task (its record and result, for `master-node result` "
                        "and `task`) this long after it ends, then delete it from memory and "
                        "the journal, whose size then stays bounded: 30s, 5m, 24h, 7d, or "
                        "seconds; 0 or never keeps every task forever (default %(default)s)")
    p.add_argument("--forget-nodes-after", default="1h", metavar="DURATION",
                   help="forget a node dead or offline this long and clear its retained status "
                        "on the broker, so viewers stop showing it (kept while queued tasks "
                        "wait for what only it runs); 0 or never keeps them (default "
                        "%(default)s)")
    add_security_options(p)


def run(args: argparse.Namespace) -> int:
    from core.credentials import tls_from_args
    from core.runtime import tune_for_messaging
    from master.retention import parse_duration
    from master.rate_limit import parse_rate_limit
    from master.retry_policy import RetryPolicy, parse_retry_on
    from master.service import ServeOptions, install_signal_handlers, serve
    retry_on = parse_retry_on(args.retry_on)
    retry = RetryPolicy(backoff=args.backoff, backoff_max=args.backoff_max,
                        retry_on=None if retry_on == ("error",) else frozenset(retry_on))
    rate_limits = tuple(parse_rate_limit(text) for text in args.rate_limit)
    result_ttl = parse_duration(args.result_ttl, option="--result-ttl")
    forget_nodes_after = parse_duration(args.forget_nodes_after, option="--forget-nodes-after")
    tune_for_messaging()
    stop = threading.Event()
    install_signal_handlers(stop)
    options = ServeOptions(broker=args.broker, config=args.config, port=args.port,
                           state_dir=args.state, root=args.root, node_timeout=args.node_timeout,
                           max_attempts=args.max_attempts, max_queued=args.max_queued,
                           master_id=args.master_id, pipelines=args.pipelines,
                           allow_remote_anonymous=args.allow_remote_anonymous,
                           snapshots=args.snapshots, snapshot_interval=args.snapshot_interval,
                           replica=args.replica, lease_ttl=args.lease_ttl,
                           password_file=args.password_file, tls=tls_from_args(args),
                           retry=retry, rate_limits=rate_limits,
                           result_ttl=result_ttl, forget_nodes_after=forget_nodes_after)

    listen = None
    if args.dashboard:
        from master.dashboard import parse_listen
        listen = parse_listen(args.dashboard)  # a bad address stops serve before it starts
    dashboards: list[Any] = []

    def start_dashboard(url: Any) -> None:
        if listen is None or dashboards:
            return
        from master.dashboard import Dashboard
        dashboard = Dashboard(broker_url=url, host=listen[0], port=listen[1], root=args.root)
        dashboards.append(dashboard.start())
        print(f"dashboard on {dashboard.url}", flush=True)

    def ready(master: Any, url: Any) -> None:
        from master.dashboard import register_queue_query
        register_queue_query(master)
        epoch = f" (active, epoch {master.epoch})" if args.replica else ""
        print(f"master ready on {url}{epoch}", flush=True)
        start_dashboard(url)

    def standby(url: Any) -> None:
        print(f"standby ready on {url}", flush=True)
        start_dashboard(url)

    def stop_dashboards() -> None:
        stop.wait()  # before the master and its broker go, so the page's client leaves quietly
        for dashboard in list(dashboards):
            dashboard.stop()

    if listen is not None:
        threading.Thread(target=stop_dashboards, name="dashboard-stop", daemon=True).start()
    try:
        return serve(options, stop=stop, on_ready=ready, on_standby=standby)
    finally:
        for dashboard in dashboards:
            dashboard.stop()
