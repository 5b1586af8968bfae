"""`master-node dashboard`: a live web page of the fabric, read over MQTT like any client."""

from __future__ import annotations

import argparse
import logging
import threading

from master.commands.common import add_client_options

NAME = "dashboard"
HELP = "serve a live web dashboard of the fabric"
DESCRIPTION = ("Serve a web page that shows the fabric live: nodes, the queue by priority, "
               "throughput, jobs, pipelines, failures and the masters. It reads the fabric "
               "over MQTT with its own --broker credentials, so it works against any broker; "
               "it listens on loopback unless told otherwise.")

log = logging.getLogger("dashboard")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="where the page is served (default %(default)s; 0.0.0.0:PORT lets "
                        "other machines see it, with no login of its own)")
    add_client_options(p)


def run(args: argparse.Namespace) -> int:
    from master.dashboard import Dashboard, parse_listen
    from master.service import install_signal_handlers
    host, port = parse_listen(args.listen)
    stop = threading.Event()
    install_signal_handlers(stop)
    from core.credentials import broker_from_args, tls_from_args
    from core.url import parse_broker_url
    dashboard = Dashboard(broker_url=broker_from_args(parse_broker_url(args.broker), args),
                          host=host, port=port, root=args.root, tls=tls_from_args(args))
    dashboard.start(timeout=args.timeout)
    print(f"dashboard on {dashboard.url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        log.info("stopping the dashboard")
        dashboard.stop()
        log.info("dashboard stopped")
    return 0
