"""Options shared by the commands that talk to a running master through the broker."""

from __future__ import annotations

import argparse
from typing import Any

from core.topics import DEFAULT_ROOT
from core.url import BROKER_ENV

__all__ = ["add_client_options", "connect", "ask"]


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", metavar="URL",
                        help=f"broker as mqtt://[user:password@]host:port (default: ${BROKER_ENV}, "
                             "else mqtt://127.0.0.1:1883)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="topic root (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for the master (default %(default)s)")


def connect(args: argparse.Namespace) -> Any:
    """A started FabricClient for the command's --broker and --root."""
    from master.client import FabricClient
    return FabricClient(broker_url=args.broker, root=args.root).start(timeout=args.timeout)


def ask(args: argparse.Namespace, what: str) -> Any:
    """Connect, put one query to the master (`nodes`, `status`, ...), disconnect."""
    client = connect(args)
    try:
        return client.query(what, timeout=args.timeout)
    finally:
        client.close()
