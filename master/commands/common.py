"""Options shared by the commands that talk to a running master through the broker."""

from __future__ import annotations

import argparse
from typing import Any

from core.credentials import add_security_options, broker_from_args, tls_from_args
from core.topics import DEFAULT_ROOT
from core.url import BROKER_ENV, parse_broker_url

__all__ = ["add_client_options", "connect", "ask"]


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", metavar="URL",
                        help=f"broker as mqtt://[user:password@]host:port (default: ${BROKER_ENV}, "
                             "else mqtt://127.0.0.1:1883)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="topic root (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for the master (default %(default)s)")
    add_security_options(parser)


def connect(args: argparse.Namespace) -> Any:
    """A started FabricClient for the command's --broker and --root."""
    from master.client import FabricClient
    broker = broker_from_args(parse_broker_url(args.broker), args)
    return FabricClient(broker_url=broker, root=args.root,
                        tls=tls_from_args(args)).start(timeout=args.timeout)


def ask(args: argparse.Namespace, what: str) -> Any:
    """Connect, put one query to the master (`nodes`, `status`, ...), disconnect."""
    client = connect(args)
    try:
        return client.query(what, timeout=args.timeout)
    finally:
        client.close()
